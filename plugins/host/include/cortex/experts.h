// The live set of experts: plugins found in folders, their default instances and the
// instances the config declares. Files are checked for safe ownership and permissions
// and copied to a private folder (so replacing a file in place never disturbs a running
// task). Each instance runs in a supervised cortex-plugin-host process that loads the
// copy with Boost.DLL; cortexd itself never runs plugin code unless told to
// (plugins.isolation: in-process). Anything off is refused with an audit event.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cortex/config.h"
#include "cortex/env.h"
#include "cortex/manifest.h"
#include "cortex/status.h"
#include "cortex/types.h"

struct cortex_manifest;  // plugins/sdk/include/cortex/plugin.h

namespace cortex {

constexpr size_t kMaxExpertOutputBytes = 64 << 10;

Status ValidateManifest(const Manifest& m);
// Validates a plugin's C manifest and copies it out; the only reader of plugin-supplied
// manifest memory (fuzzed in tests/fuzz).
Status ManifestFromC(const cortex_manifest* m, Manifest* out);

// How a misbehaving expert is handled: a crashed host is restarted after a backoff that
// doubles with each consecutive crash; after `quarantine_after` of them the expert is
// quarantined (not routed to) until released or its file changes.
struct Supervision {
  int quarantine_after = 5;
  double backoff_s = 0.25;
  double backoff_max_s = 30;
  double hang_grace_s = 1;  // after a timeout, how long a plugin may take to notice
  size_t memory_limit = 1ull << 30;
  // Called whenever a slot of any expert frees up (from any thread, holding no lock of
  // the registry's): a dispatcher waiting for capacity looks again.
  std::function<void()> on_slot_free;
  // What deadlines, backoff and crash times are measured by (null: the real clock). The
  // registry sets its own Env here, so a test can move time on.
  Env* clock = nullptr;
};

struct ExpertHealth {
  std::string state = "active";  // active, restarting, quarantined
  int consecutive_crashes = 0;
  long crashes = 0;       // crash events: a host death, or a crash the plugin reported
  long restarts = 0;      // hosts started after the first
  double crash_rate = 0;  // recent share of attempts that ended in `crash` (decaying)
  std::string last_crash;
  double last_crash_at = 0;   // unix seconds
  double quarantined_at = 0;  // unix seconds, when quarantined
  double retry_in_s = 0;      // while restarting: until the next start
};

struct PluginFile;  // a plugin file the registry accepted (experts.cc)
class HealthState;  // crash bookkeeping, shared with host death callbacks (experts.cc)
class HostProcess;  // a supervised cortex-plugin-host (host_process.h)

// One expert instance. By default it runs in a cortex-plugin-host process of its own,
// so its crashes, hangs and memory use stay there; in the opt-in in-process mode it
// runs on a thread of cortexd.
class Expert : public std::enable_shared_from_this<Expert> {
 public:
  // `fingerprint` identifies the library and instance settings, so a rescan can keep
  // an unchanged instance (and its in-flight count) instead of recreating it.
  Expert(std::shared_ptr<PluginFile> file, Manifest manifest, std::string plugin,
         std::string settings, std::string fingerprint, Supervision supervision,
         std::function<void(const std::string&, const std::string&)> audit);
  ~Expert();
  Expert(const Expert&) = delete;
  Expert& operator=(const Expert&) = delete;

  // Creates the instance: starts its host and calls create() there (or here, in-process).
  // Errors from create() read "key: message".
  Status Start();

  const std::string& name() const { return manifest_.name; }
  const Manifest& manifest() const { return manifest_; }
  const std::string& plugin() const { return plugin_; }
  const std::string& file() const;
  const std::string& fingerprint() const { return fingerprint_; }
  bool isolated() const;  // runs in a host process
  int inflight() const;
  double load() const;
  ExpertHealth health() const;
  bool quarantined() const;
  // 0 (healthy) .. 1 (restarting): how much routing should avoid it.
  double health_penalty() const;
  int host_pid() const;         // 0 when none is running
  size_t memory_limit() const;  // enforced on its host; 0: none
  // Lifts a quarantine: the next task starts a fresh host.
  Status Release();

  // Runs one task within its timeout. Waits for a free slot first (at most the timeout;
  // then the outcome is `rejected`). A plugin that overruns keeps its slot until it
  // returns or its host is killed, but the caller gets `timeout` at the deadline; a
  // host that dies gives `crash`. Never throws.
  Outcome Run(const Task& task, const std::atomic<bool>* stopping);

  // The same in steps, for a pipeline that must never wait for a busy expert, and that
  // hands a batch of tasks to their experts before it waits for any of them:
  // TryAcquireSlot takes a free slot or returns false at once; ReleaseSlot gives one back
  // unused.
  bool TryAcquireSlot();
  void ReleaseSlot();
  // Begin sends the task on its way (on a slot taken with TryAcquireSlot) and returns
  // without waiting for it to run; `on_ready`, if set, is called (from any thread, maybe
  // before Begin returns) once the plugin is done with it. Await waits for its outcome (within the
  // timeout counted from Begin, or until *stopping) and frees the slot; Ready says whether it would
  // return at once (the plugin is done, the deadline has passed or *stopping is set). An expert
  // whose plugin host must first be started (after a crash, within its backoff) starts it on a
  // thread of its own, so Begin never waits for that either.
  class Attempt;
  std::shared_ptr<Attempt> Begin(const Task& task,
                                 std::shared_ptr<const std::atomic<bool>> stopping,
                                 std::function<void()> on_ready = nullptr);
  // While one lives on a thread, the tasks that thread Begins on plugin hosts are sent
  // at its end, each host's in one write, instead of one write each. Their attempts
  // must outlive it (they keep the hosts).
  class SendTogether {
   public:
    SendTogether();
    ~SendTogether();

   private:
    struct Held;
    std::unique_ptr<Held> held_;
  };
  bool Ready(const Attempt& attempt) const;
  Outcome Await(Attempt& attempt);

 private:
  struct Slots;
  void BeginInProcess(const Task& task, Attempt* a, std::function<void()> on_ready);
  Outcome AwaitInProcess(Attempt* a);
  void BeginHosted(const Task& task, Attempt* a, std::function<void()> on_ready);
  Outcome AwaitHosted(Attempt* a);
  Status EnsureHost(int64_t deadline, const std::atomic<bool>* stopping,
                    std::shared_ptr<HostProcess>* out, OutcomeKind* kind);
  Status StartHost(std::shared_ptr<HostProcess>* out);

  std::shared_ptr<PluginFile> file_;
  Manifest manifest_;
  std::string plugin_;
  std::string settings_;
  std::string fingerprint_;
  Env* const clock_;
  std::shared_ptr<Slots> slots_;
  std::shared_ptr<HealthState> health_;
  void* instance_ = nullptr;  // in-process only
  std::shared_ptr<HostProcess> CurrentHost() const;
  std::mutex restart_mu_;       // held while a host starts; guards started_once_
  mutable std::mutex host_mu_;  // guards host_ only, held briefly
  std::shared_ptr<HostProcess> host_;
  bool started_once_ = false;
};

struct ExpertInfo {
  std::string name;
  std::string version;
  std::string plugin;
  std::string file;
  std::string state;  // active, removed
  std::string description;
  std::vector<std::string> keywords;
  int inflight = 0;
  int capacity = 0;
  double timeout_s = 0;
  std::string isolation;  // process, in-process
  int host_pid = 0;
  size_t memory_limit = 0;
  ExpertHealth health;
};

// The bundled plugins that are part of cortexd itself (configurable: a config's experts
// are instances of them), loaded even with plugins.bundled off.
inline constexpr const char* kCorePlugins[] = {"command.so"};

class ExpertRegistry {
 public:
  struct Options {
    std::vector<std::string> dirs;  // scanned in order
    // One of `dirs` whose only loaded files are kCorePlugins: the bundled folder when
    // plugins.bundled is off (the configurable plugins are part of cortexd, not optional).
    std::string core_only_dir;
    std::string cache_dir;  // private 0700 folder for load copies
    Env* env = Env::Default();
    bool in_process = false;            // trusted plugins only: a crash takes cortexd down
    std::string host_exe;               // cortex-plugin-host
    std::vector<std::string> host_env;  // names of cortexd's variables hosts inherit
    double load_timeout_s = 10;         // a load or create() that does not answer is refused
    Supervision supervision;
    std::function<void(const ExpertEvent&)> audit;  // every load, refusal and removal
    // Logs each load, refusal and removal too; off for a scratch registry that only checks
    // a config (--check-config, --print-config, a refused reload), whose loads are not real.
    bool log_events = true;
  };
  explicit ExpertRegistry(Options options);
  ~ExpertRegistry();

  // Loads or refreshes plugins whose files appeared, changed or disappeared.
  void Rescan();
  // Sets the configured instances (validated against the loaded plugins: unknown
  // plugin, unknown or bad settings are errors naming file, line and key). On error
  // nothing changes.
  Status Configure(const Config& config);

  std::vector<std::shared_ptr<Expert>> Active() const;
  std::shared_ptr<Expert> Find(const std::string& name) const;
  // Lifts an expert's quarantine (`cortexctl experts release NAME`).
  Status Release(const std::string& name);
  std::vector<ExpertInfo> List() const;
  // Bumped whenever the set of active experts changes.
  uint64_t generation() const { return generation_.load(); }

 private:
  struct FileRecord;
  struct Built;
  // `opened` describes the file actually opened (for the change check of the next rescan).
  Status LoadFile(const std::string& path, std::shared_ptr<PluginFile>* out, FileInfo* opened);
  Status NewExpert(const std::shared_ptr<PluginFile>& file, Manifest man, const std::string& plugin,
                   const std::string& settings, const std::string& fingerprint,
                   std::shared_ptr<Expert>* out);
  Status CheckSafe(const std::string& path, bool is_dir);
  Status CopyChecked(const std::string& path, const std::string& dst, FileInfo* opened);
  Status BuildInstances(const std::vector<ExpertConfig>& instances, const std::string& source,
                        std::map<std::string, std::shared_ptr<Expert>>* out);
  void RebuildLocked(std::map<std::string, std::shared_ptr<Expert>>* prebuilt = nullptr);
  void Audit(const std::string& expert, const std::string& file, const std::string& event,
             const std::string& detail);

  Options options_;
  // mu_ serialises the writers (Rescan, Configure), which hold it through slow work:
  // loading files and starting hosts. state_mu_ guards what readers see (active_,
  // removed_) and is held only briefly, so `experts`, routing and status never wait for
  // a plugin that is slow to load.
  mutable std::mutex mu_;
  mutable std::mutex state_mu_;
  std::map<std::string, std::unique_ptr<FileRecord>> files_;    // by path
  std::map<std::string, std::shared_ptr<PluginFile>> plugins_;  // by plugin name
  std::vector<ExpertConfig> instances_;
  std::string instances_source_;
  std::map<std::string, std::shared_ptr<Expert>> active_;
  std::map<std::string, ExpertInfo> removed_;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace cortex
