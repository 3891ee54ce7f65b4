// cortexd's side of one plugin host: spawns cortex-plugin-host (no shell, its own
// process group, stdin from /dev/null, a clean signal mask, stdout and stderr on pipes of
// cortexd's), reads its frames and its output on a thread of its own and turns its death
// into typed outcomes. Nothing here runs plugin code; everything the host says is checked
// (host_protocol.h), and what it prints is logged under its name, escaped and bounded.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "cortex/env.h"
#include "cortex/experts.h"
#include "cortex/status.h"
#include "cortex/types.h"
#include "host_protocol.h"

namespace cortex {

struct HostOptions {
  std::string exe;      // cortex-plugin-host
  std::string library;  // the private copy it loads
  std::string display;  // the user's file, for messages
  std::string label;    // who its output is logged as ("expert NAME"; default "plugin FILE")
  size_t memory_limit = 0;
  double start_timeout_s = 10;
  std::vector<std::string> env_names;  // cortexd's variables the host may see
  Env* clock = nullptr;                // deadlines are measured by it (null: the real one)
};

class HostProcess {
 public:
  // Called once, on the reader thread, when the host dies of something cortexd did not
  // do to it (a crash, an abort, running out of memory, a protocol violation).
  using DeathFn = std::function<void(const std::string& why)>;

  // Spawns the host and waits for its hello: the plugin's validated manifest, or why
  // the library was refused.
  static Status Start(const HostOptions& options, DeathFn on_death,
                      std::shared_ptr<HostProcess>* out, Manifest* manifest);
  ~HostProcess();  // asks the host to exit, kills it if it does not, reaps it

  // Creates the plugin instance in the host ("key: message" errors come from the plugin).
  Status Create(const std::string& settings_json, double timeout_s);

  struct PendingRun {
    uint64_t id = 0;
    bool done = false;  // guarded by the host's mutex; wait with WaitRun
    // The host died under it: the outcome is `crash`, or `interrupted` when cortexd killed
    // the host for another task's hang (this one did nothing wrong and may run again).
    bool host_died = false;
    // Its own wake-up: a result wakes the one caller waiting for it, not every caller
    // with a task on this host.
    std::condition_variable cv;
    Outcome outcome;
    std::function<void()> on_end;  // runs once, when the host is done with the task
  };
  // Sends a task. Returns null if the host is gone (on_end is then not kept).
  std::shared_ptr<PendingRun> Submit(const Task& task, int64_t deadline_unix_ms,
                                     std::function<void()> on_end);
  bool Done(const PendingRun& run) const;
  // Waits until the run is done, `deadline_us` (monotonic) passes or *stop is set.
  bool WaitRun(PendingRun& run, int64_t deadline_us, const std::atomic<bool>* stop);
  // The caller stopped waiting: cancel the task; if it is still running `grace_s` later
  // the host is killed (a hung plugin would hold its slot forever) and restarted on use.
  void Abandon(const std::shared_ptr<PendingRun>& run, double grace_s);

  pid_t pid() const { return pid_; }
  bool alive() const;
  size_t memory_limit() const { return memory_limit_; }  // 0: not enforced

 private:
  HostProcess() = default;
  int64_t Now() const {
    return (options_.clock ? options_.clock : Env::Default())->MonotonicMicros();
  }
  void ReadLoop();
  void ReadOutput(int stream);  // 0 stdout, 1 stderr
  void HandleFrame(const nlohmann::json& f);
  void Die(std::string why);
  Status Send(const nlohmann::json& f, bool may_hold = false);

  HostOptions options_;
  DeathFn on_death_;
  pid_t pid_ = -1;
  int fd_ = -1;
  int out_fd_[2] = {-1, -1};  // the host's stdout and stderr (reader thread only)
  struct Output;
  std::unique_ptr<Output> output_;  // what it printed, on its way to the log (reader only)
  size_t memory_limit_ = 0;
  std::thread reader_;
  std::unique_ptr<hostproto::FrameWriter> writer_;  // on fd_

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool hello_ = false, dead_ = false, ours_ = false;
  std::string hello_error_;
  nlohmann::json hello_manifest_;
  bool created_ = false;
  std::string create_error_;
  std::string death_;
  std::string violation_;  // set when the host broke the protocol
  bool hung_ = false;      // set when cortexd kills it for a hung task
  bool oom_ = false;
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::shared_ptr<PendingRun>> pending_;
  std::map<uint64_t, int64_t> kill_at_;  // abandoned runs: monotonic micros
};

}  // namespace cortex
