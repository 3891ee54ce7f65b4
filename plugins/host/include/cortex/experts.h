// The live set of experts: plugins found in folders (loaded with Boost.DLL), their
// default instances and the instances the config declares. Files are checked for safe
// ownership and permissions, loaded from a private copy (so replacing a file in place
// never disturbs a running task), and refused with an audit event when anything is off.
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
#include "cortex/status.h"
#include "cortex/types.h"

struct cortex_manifest;  // plugins/sdk/include/cortex/plugin.h

namespace cortex {

constexpr size_t kMaxExpertOutputBytes = 64 << 10;

struct Manifest {
  std::string name;
  std::string version;
  std::string description;
  std::vector<std::string> keywords;
  std::vector<std::string> examples;
  std::vector<std::string> config_keys;
  int capacity = 1;
  double timeout_s = 60;
  bool requires_config = false;
};

// Validates a plugin's C manifest and copies it out; the only reader of plugin-supplied
// manifest memory (fuzzed in tests/fuzz).
Status ManifestFromC(const cortex_manifest* m, Manifest* out);

class PluginLibrary;  // a loaded .so and its API table

class Expert : public std::enable_shared_from_this<Expert> {
 public:
  // `fingerprint` identifies the library and instance settings, so a rescan can keep
  // an unchanged instance (and its in-flight count) instead of recreating it.
  Expert(std::shared_ptr<PluginLibrary> lib, void* instance, Manifest manifest, std::string plugin,
         std::string file, std::string fingerprint);
  ~Expert();
  Expert(const Expert&) = delete;
  Expert& operator=(const Expert&) = delete;

  const std::string& name() const { return manifest_.name; }
  const Manifest& manifest() const { return manifest_; }
  const std::string& plugin() const { return plugin_; }
  const std::string& file() const { return file_; }
  const std::string& fingerprint() const { return fingerprint_; }
  int inflight() const { return inflight_.load(); }
  double load() const;

  // Runs one task within its timeout. Waits for a free slot first (at most the timeout;
  // then the outcome is `rejected`). A plugin that overruns keeps its slot until it
  // returns, but the caller gets `timeout` at the deadline. Never throws.
  Outcome Run(const Task& task, const std::atomic<bool>* stopping);

 private:
  bool AcquireSlot(int64_t deadline_us, const std::atomic<bool>* stopping);
  void ReleaseSlot();

  std::shared_ptr<PluginLibrary> lib_;
  void* instance_;
  Manifest manifest_;
  std::string plugin_;
  std::string file_;
  std::string fingerprint_;
  std::atomic<int> inflight_{0};
  std::mutex slot_mu_;
  std::condition_variable slot_cv_;
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
};

class ExpertRegistry {
 public:
  struct Options {
    std::vector<std::string> dirs;  // scanned in order
    std::string cache_dir;          // private 0700 folder for load copies
    Env* env = Env::Default();
    std::function<void(const ExpertEvent&)> audit;  // every load, refusal and removal
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
  std::vector<ExpertInfo> List() const;
  // Bumped whenever the set of active experts changes.
  uint64_t generation() const { return generation_.load(); }

 private:
  struct FileRecord;
  struct Built;
  Status LoadFile(const std::string& path, std::shared_ptr<PluginLibrary>* out);
  Status CheckSafe(const std::string& path, bool is_dir);
  Status BuildInstances(const std::vector<ExpertConfig>& instances, const std::string& source,
                        std::map<std::string, std::shared_ptr<Expert>>* out);
  void RebuildLocked();
  void Audit(const std::string& expert, const std::string& file, const std::string& event,
             const std::string& detail);

  Options options_;
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<FileRecord>> files_;       // by path
  std::map<std::string, std::shared_ptr<PluginLibrary>> plugins_;  // by plugin name
  std::vector<ExpertConfig> instances_;
  std::string instances_source_;
  std::map<std::string, std::shared_ptr<Expert>> active_;
  std::map<std::string, ExpertInfo> removed_;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace cortex
