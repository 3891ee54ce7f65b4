#include "host_process.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iterator>

#include <fmt/format.h>

#include "cortex/env.h"
#include "cortex/log.h"
#include "host_protocol.h"
#include "process_tree.h"

extern char** environ;

namespace cortex {

using json = nlohmann::json;

namespace {

std::string DescribeExit(int status, size_t memory_limit) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = sigabbrev_np(sig);
    return fmt::format("the plugin host was killed by SIG{} ({})", name ? name : "?",
                       strsignal(sig));
  }
  if (WIFEXITED(status)) {
    int code = WEXITSTATUS(status);
    if (code == hostproto::kExitOutOfMemory)
      return fmt::format("the plugin ran out of memory (limit {} MiB)", memory_limit >> 20);
    return fmt::format("the plugin host exited with status {}", code);
  }
  return "the plugin host stopped";
}

}  // namespace

Status HostProcess::Start(const HostOptions& options, DeathFn on_death,
                          std::shared_ptr<HostProcess>* out, Manifest* manifest) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return Status::IOError(std::string("socketpair: ") + strerror(errno));
  // The child's end goes to fd 3 by dup2 (which clears close-on-exec); from a high,
  // still close-on-exec descriptor, so dup2 never has to map an fd onto itself.
  int child = fcntl(sv[1], F_DUPFD_CLOEXEC, 64);
  close(sv[1]);
  if (child < 0) {
    close(sv[0]);
    return Status::IOError(std::string("fcntl: ") + strerror(errno));
  }
  // A host that stops reading (stopped, wedged) must not block a worker forever.
  struct timeval tv = {5, 0};
  setsockopt(sv[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, 2, 1);  // a plugin's stdout joins cortexd's log
  posix_spawn_file_actions_adddup2(&fa, child, hostproto::kHostFd);
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34)
  // Nothing else of cortexd's reaches the plugin, even a descriptor opened without
  // close-on-exec by a library.
  posix_spawn_file_actions_addclosefrom_np(&fa, hostproto::kHostFd + 1);
#endif
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int s : {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGCHLD}) sigaddset(&defaults, s);
  posix_spawnattr_setsigmask(&attr, &none);  // cortexd blocks signals for its signalfd
  posix_spawnattr_setsigdefault(&attr, &defaults);
  // A session of its own: a terminal's ^C reaches cortexd, not its hosts, and everything
  // the plugin starts carries the host's session id, so it can all be ended together.
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
  // A clean environment: only the allowed variables of cortexd's own (plugins.env), and
  // the sanitizer runtimes' settings, which only a sanitized build reads.
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const std::string name = kv.substr(0, kv.find('='));
    static const char* const kRuntime[] = {"ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS",
                                           "LSAN_OPTIONS"};
    if (std::find(options.env_names.begin(), options.env_names.end(), name) !=
            options.env_names.end() ||
        std::find(std::begin(kRuntime), std::end(kRuntime), name) != std::end(kRuntime))
      env.push_back(kv);
  }
  std::vector<char*> envp;
  for (auto& kv : env) envp.push_back(kv.data());
  envp.push_back(nullptr);
  std::string limit = std::to_string(options.memory_limit);
  const char* argv[] = {
      options.exe.c_str(),     "--library",      options.library.c_str(), "--display",
      options.display.c_str(), "--memory-limit", limit.c_str(),           nullptr};
  pid_t pid = -1;
  int rc =
      posix_spawn(&pid, options.exe.c_str(), &fa, &attr, const_cast<char**>(argv), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(child);
  if (rc != 0) {
    close(sv[0]);
    return Status::IOError("cannot start the plugin host " + options.exe + ": " + strerror(rc));
  }

  std::shared_ptr<HostProcess> h(new HostProcess());
  h->options_ = options;
  h->on_death_ = std::move(on_death);
  h->pid_ = pid;
  h->fd_ = sv[0];
  // A host that cannot take a frame is of no use: it is ended, and its reader fails
  // whatever it was running (a frame may have been written for several tasks at once).
  h->writer_ = std::make_unique<hostproto::FrameWriter>(
      h->fd_, [pid, display = options.display](const Status& st) {
        LogWarn("plugin host {} ({}): {}", pid, display, st.message());
        ::kill(pid, SIGKILL);
      });
  h->reader_ = std::thread([p = h.get()] {
    pthread_setname_np(pthread_self(), "host-reader");
    p->ReadLoop();
  });

  // The reader notifies cv_ after every frame and when the host dies.
  std::unique_lock<std::mutex> l(h->mu_);
  h->cv_.wait_for(l, std::chrono::duration<double>(options.start_timeout_s),
                  [&] { return h->hello_ || h->dead_; });
  if (!h->hello_) {
    std::string why =
        h->dead_ ? h->death_ : fmt::format("no answer within {:g}s", options.start_timeout_s);
    l.unlock();
    return Status::FailedPrecondition("the plugin host could not load it: " + why);
  }
  if (!h->hello_error_.empty()) {
    std::string why = h->hello_error_;
    l.unlock();
    return Status::FailedPrecondition(why);
  }
  Status st = hostproto::ManifestFromJson(h->hello_manifest_, manifest);
  l.unlock();
  if (!st.ok()) return st;
  *out = std::move(h);
  return Status::OK();
}

HostProcess::~HostProcess() {
  {
    std::lock_guard<std::mutex> l(mu_);
    ours_ = true;
  }
  (void)Send({{"op", "exit"}});
  {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::milliseconds(500), [&] { return dead_; });
  }
  ::shutdown(fd_, SHUT_RDWR);  // the reader sees the end; it kills and reaps the host
  if (reader_.joinable()) reader_.join();
  close(fd_);
}

bool HostProcess::alive() const {
  std::lock_guard<std::mutex> l(mu_);
  return !dead_;
}

Status HostProcess::Send(const json& f, bool may_hold) { return writer_->Send(f, may_hold); }

Status HostProcess::Create(const std::string& settings_json, double timeout_s) {
  CORTEX_RETURN_IF_ERROR(Send({{"op", "create"}, {"settings", settings_json}}));
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, std::chrono::duration<double>(timeout_s), [&] { return created_ || dead_; });
  if (created_) {
    if (create_error_.empty()) return Status::OK();
    return Status::InvalidArgument(create_error_);
  }
  const bool dead = dead_;
  std::string why = dead ? death_ : fmt::format("create() did not return within {:g}s", timeout_s);
  l.unlock();
  if (!dead) ::kill(pid_, SIGKILL);
  return Status::FailedPrecondition("creating the instance failed: " + why);
}

std::shared_ptr<HostProcess::PendingRun> HostProcess::Submit(const Task& task,
                                                             int64_t deadline_unix_ms,
                                                             std::function<void()> on_end) {
  auto run = std::make_shared<PendingRun>();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (dead_) return nullptr;
    run->id = next_id_++;
    run->on_end = std::move(on_end);
    pending_[run->id] = run;
  }
  // (Held while the caller batches its sends: Expert::SendTogether.)
  Status st = Send(
      {{"op", "run"}, {"id", run->id}, {"task", hostproto::TaskToJson(task, deadline_unix_ms)}},
      /*may_hold=*/true);
  if (!st.ok()) {
    // A host that cannot take a task is of no use: end it; the reader fails the run. (A
    // held frame's failed write does the same through the writer's on_fail.)
    LogWarn("plugin host {} ({}): {}", pid_, options_.display, st.message());
    ::kill(pid_, SIGKILL);
  }
  return run;
}

bool HostProcess::Done(const PendingRun& run) const {
  std::lock_guard<std::mutex> l(mu_);
  return run.done;
}

bool HostProcess::WaitRun(PendingRun& run, int64_t deadline_us, const std::atomic<bool>* stop) {
  std::unique_lock<std::mutex> l(mu_);
  while (!run.done) {
    if (stop && stop->load()) return false;
    int64_t left = deadline_us - Now();
    if (left <= 0) return false;
    run.cv.wait_for(l, std::chrono::microseconds(std::min<int64_t>(left, 100000)));
  }
  return true;
}

void HostProcess::Abandon(const std::shared_ptr<PendingRun>& run, double grace_s) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (run->done || dead_) return;
    kill_at_[run->id] = Now() + static_cast<int64_t>(grace_s * 1e6);
  }
  (void)Send({{"op", "cancel"}, {"id", run->id}});
}

void HostProcess::HandleFrame(const json& f) {
  const std::string op = f["op"].get<std::string>();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (op == "hello" && !hello_) {
      hello_ = true;
      if (f.contains("error") && f["error"].is_string()) {
        hello_error_ = f["error"].get<std::string>().substr(0, 2048);
        if (hello_error_.empty()) hello_error_ = "refused";
      } else {
        hello_manifest_ = f.value("manifest", json());
        auto ml = f.find("memory_limit");
        memory_limit_ = ml != f.end() && ml->is_number_unsigned() ? ml->get<size_t>() : 0;
      }
    } else if (op == "created" && hello_ && !created_) {
      created_ = true;
      if (f.contains("error") && f["error"].is_string())
        create_error_ = f["error"].get<std::string>().substr(0, 1024);
    } else if (op == "result" && f.contains("id") && f["id"].is_number_unsigned()) {
      auto it = pending_.find(f["id"].get<uint64_t>());
      if (it == pending_.end()) {
        violation_ = "a result for a task it was not given";
      } else {
        Status st = hostproto::OutcomeFromJson(f.value("outcome", json()), &it->second->outcome);
        if (!st.ok()) {
          violation_ = st.message();
        } else {
          // The slot is free before the caller hears of the result. (on_end only
          // releases a slot: it never takes this mutex.)
          if (it->second->on_end) it->second->on_end();
          it->second->on_end = nullptr;
          it->second->done = true;
          it->second->cv.notify_one();
          kill_at_.erase(it->first);
          pending_.erase(it);
        }
      }
    } else if (op == "oom") {
      oom_ = true;
    } else {
      violation_ = "an unexpected '" + op.substr(0, 64) + "' frame";
    }
  }
  cv_.notify_all();
}

void HostProcess::ReadLoop() {
  hostproto::FrameReader reader;
  char buf[65536];
  int status = 0;
  // A read gives up after 100 ms of silence, so that hung tasks and a host that died
  // without closing the socket are noticed; while frames flow, one call per read.
  struct timeval tick = {0, 100000};
  setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
  while (true) {
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) break;
    if (n > 0) {
      std::vector<json> frames;
      Status st = reader.Feed(buf, static_cast<size_t>(n), &frames);
      for (const auto& f : frames) HandleFrame(f);
      if (!st.ok()) {
        std::lock_guard<std::mutex> l(mu_);
        violation_ = st.message();
      }
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!violation_.empty()) break;
      const int64_t now = Now();
      for (const auto& [id, at] : kill_at_)
        if (now >= at && pending_.count(id)) hung_ = true;
      if (hung_) break;
    }
    // A host that died while a process it forked still holds the socket gives no EOF:
    // silence is when to look.
    siginfo_t si{};
    if (n < 0 && waitid(P_PID, pid_, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid_)
      break;
  }
  ::kill(pid_, SIGKILL);  // whatever the reason we stopped reading, the host goes now
  // Once it is a zombie (its pid, and so its session id, cannot be reused yet), end what
  // it leaves behind: a crashed or killed host cannot do that itself. Then reap it.
  siginfo_t si{};
  while (waitid(P_PID, pid_, &si, WEXITED | WNOWAIT) != 0 && errno == EINTR) {
  }
  if (int n = KillSession(pid_, pid_))
    LogInfo("plugin host {} ({}): ended {} process(es) it left behind", pid_, options_.display, n);
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  std::string why;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!violation_.empty())
      why = "the plugin host broke the protocol (" + violation_ + ")";
    else if (hung_)
      why = "the plugin host was restarted: another task hung past its timeout";
    else if (oom_)
      why = fmt::format("the plugin ran out of memory (limit {} MiB)", memory_limit_ >> 20);
    else
      why = DescribeExit(status, memory_limit_);
  }
  Die(why);
}

void HostProcess::Die(std::string why) {
  bool report;
  {
    std::lock_guard<std::mutex> l(mu_);
    dead_ = true;  // from here on Submit refuses, so pending_ only shrinks
    death_ = why;
    report = !ours_ && !hung_;
  }
  // The crash is counted (and the restart backoff set) before any waiting caller learns
  // of it, so a caller's next task already sees the expert's new health.
  if (report) {
    LogWarn("plugin host {} for {}: {}", pid_, options_.display, why);
    if (on_death_) on_death_(why);
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [id, run] : pending_) {
      if (run->on_end) run->on_end();  // slots first, as for a result
      run->on_end = nullptr;
      run->host_died = true;
      run->outcome = Outcome();
      run->outcome.kind = OutcomeKind::kCrash;
      run->outcome.error = why;
      run->done = true;
      run->cv.notify_one();
    }
    pending_.clear();
    kill_at_.clear();
  }
  cv_.notify_all();
}

}  // namespace cortex
