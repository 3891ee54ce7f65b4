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

std::string OverTheLimit(size_t memory_limit) {
  return fmt::format("the plugin ran out of memory: over its memory limit ({} MiB)",
                     memory_limit >> 20);
}

std::string DescribeExit(int status, size_t memory_limit) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    const char* name = sigabbrev_np(sig);
    return fmt::format("the plugin host was killed by SIG{} ({})", name ? name : "?",
                       strsignal(sig));
  }
  if (WIFEXITED(status)) {
    int code = WEXITSTATUS(status);
    if (code == hostproto::kExitOutOfMemory) return OverTheLimit(memory_limit);
    return fmt::format("the plugin host exited with status {}", code);
  }
  return "the plugin host stopped";
}

// What a host prints: at most this many lines a minute of each stream go to the log, each
// cut at so many bytes; the rest is counted, and said in one line once the flood pauses
// for a second, the minute is over or the host ends.
constexpr size_t kOutputLines = 100;
constexpr size_t kOutputLineBytes = 512;
constexpr int64_t kOutputWindowUs = 60 * 1000000LL;
constexpr int64_t kOutputQuietUs = 1000000;

// A descriptor of our own at 64 or above and close-on-exec, so that the child's dup2
// onto 0-3 never maps it onto itself (which would keep close-on-exec).
int HighFd(int fd) {
  int high = fcntl(fd, F_DUPFD_CLOEXEC, 64);
  close(fd);
  return high;
}

}  // namespace

// A line at a time into cortexd's log, under the host's label and the stream's name
// (LogLine escapes control characters, so no line can pass for one of cortexd's own).
struct HostProcess::Output {
  std::string label;
  std::string partial[2];  // an unfinished line per stream, at most kOutputLineBytes
  size_t cut[2] = {0, 0};  // bytes of it past that
  int64_t window_start = 0;
  size_t lines[2] = {0, 0};  // logged in this window, per stream
  size_t dropped_lines = 0, dropped_bytes = 0;
  int64_t last_drop = 0;

  void Feed(int stream, const char* p, size_t n, int64_t now) {
    while (n > 0) {
      const char* nl = static_cast<const char*>(std::memchr(p, '\n', n));
      const size_t len = nl ? static_cast<size_t>(nl - p) : n;
      const size_t room = kOutputLineBytes - partial[stream].size();
      partial[stream].append(p, std::min(len, room));
      cut[stream] += len - std::min(len, room);
      if (!nl) break;
      Line(stream, now);
      p += len + 1;
      n -= len + 1;
    }
  }
  void Line(int stream, int64_t now) {
    std::string& line = partial[stream];
    if (now - window_start >= kOutputWindowUs) {
      Dropped();
      window_start = now;
      lines[0] = lines[1] = 0;
    }
    if (lines[stream] < kOutputLines) {
      ++lines[stream];
      LogInfo("{} [{}]: {}{}", label, stream ? "stderr" : "stdout", line,
              cut[stream] ? fmt::format("... ({} more bytes)", cut[stream]) : "");
    } else {
      ++dropped_lines;
      dropped_bytes += line.size() + cut[stream] + 1;
      last_drop = now;
    }
    line.clear();
    cut[stream] = 0;
  }
  // Called every turn of the reader: what was dropped is said once the flood pauses.
  void Tick(int64_t now) {
    if (dropped_lines &&
        (now - last_drop >= kOutputQuietUs || now - window_start >= kOutputWindowUs))
      Dropped();
  }
  void End(int64_t now) {
    for (int s = 0; s < 2; ++s)
      if (!partial[s].empty() || cut[s]) Line(s, now);
    Dropped();
  }
  void Dropped() {
    if (!dropped_lines) return;
    LogWarn(
        "{}: {} line{} ({} bytes) of its stdout and stderr dropped (at most {} lines a "
        "minute of each are logged)",
        label, dropped_lines, dropped_lines == 1 ? "" : "s", dropped_bytes, kOutputLines);
    dropped_lines = dropped_bytes = 0;
  }
};

Status HostProcess::Start(const HostOptions& options, DeathFn on_death,
                          std::shared_ptr<HostProcess>* out, Manifest* manifest) {
  // The host runs as cortexd's user: judged at every spawn (a restart after a crash too),
  // since a file or folder another user may change can be swapped at any time.
  CORTEX_RETURN_IF_ERROR(
      CheckTrustedPath(options.exe, false).WithContext("refusing to run the plugin host"));
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
  // Its stdout and stderr: pipes cortexd reads (ReadLoop), not cortexd's own log.
  int stdio[2][2] = {{-1, -1}, {-1, -1}};
  for (auto& pipe : stdio) {
    if (pipe2(pipe, O_CLOEXEC) != 0 || (pipe[1] = HighFd(pipe[1])) < 0) {
      const std::string why = std::string("pipe: ") + strerror(errno);
      for (auto& q : stdio)
        for (int fd : q)
          if (fd >= 0) close(fd);
      close(sv[0]);
      close(child);
      return Status::IOError(why);
    }
    fcntl(pipe[0], F_SETFL, O_NONBLOCK);
  }

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, stdio[0][1], 1);
  posix_spawn_file_actions_adddup2(&fa, stdio[1][1], 2);
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
  for (auto& pipe : stdio) close(pipe[1]);
  if (rc != 0) {
    close(sv[0]);
    for (auto& pipe : stdio) close(pipe[0]);
    return Status::IOError("cannot start the plugin host " + options.exe + ": " + strerror(rc));
  }

  std::shared_ptr<HostProcess> h(new HostProcess());
  h->options_ = options;
  h->on_death_ = std::move(on_death);
  h->pid_ = pid;
  h->fd_ = sv[0];
  h->out_fd_[0] = stdio[0][0];
  h->out_fd_[1] = stdio[1][0];
  h->output_ = std::make_unique<Output>();
  h->output_->label = options.label.empty() ? "plugin " + options.display : options.label;
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
  while (true) {
    // Frames and output as they come; after 100 ms of silence a turn anyway, so that hung
    // tasks and a host that died without closing the socket are noticed.
    struct pollfd p[3] = {{fd_, POLLIN, 0}, {out_fd_[0], POLLIN, 0}, {out_fd_[1], POLLIN, 0}};
    const int ready = ::poll(p, 3, 100);
    for (int s = 0; s < 2; ++s)
      if (ready > 0 && p[s + 1].revents) ReadOutput(s);
    output_->Tick(Now());
    ssize_t n = -1;  // -1: no frame bytes this turn
    if (ready > 0 && p[0].revents) {
      n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) break;
    }
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
  // What it printed last: everything its processes wrote before they ended (at most a
  // pipe's worth each; a writer that escaped its session is not waited for).
  for (int s = 0; s < 2; ++s) {
    ReadOutput(s);
    if (out_fd_[s] >= 0) close(out_fd_[s]);
    out_fd_[s] = -1;
  }
  output_->End(Now());
  std::string why;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!violation_.empty())
      why = "the plugin host broke the protocol (" + violation_ + ")";
    else if (hung_)
      why = "a task hung past its timeout and ignored its cancel: its plugin host was killed";
    else if (oom_)
      why = OverTheLimit(memory_limit_);
    else
      why = DescribeExit(status, memory_limit_);
  }
  Die(why);
}

void HostProcess::ReadOutput(int stream) {
  int& fd = out_fd_[stream];
  char buf[65536];
  // A bounded share per turn: a flood must not keep the frames waiting.
  for (int i = 0; fd >= 0 && i < 16; ++i) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {  // every writer is gone
      close(fd);
      fd = -1;
      return;
    }
    output_->Feed(stream, buf, static_cast<size_t>(n), Now());
  }
}

void HostProcess::Die(std::string why) {
  bool report;
  {
    std::lock_guard<std::mutex> l(mu_);
    dead_ = true;  // from here on Submit refuses, so pending_ only shrinks
    death_ = why;
    // A hang counts as one crash, however many tasks its host took along.
    report = !ours_;
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
      // The others on a host killed for a hang did nothing wrong: interrupted, to run again.
      // (Those that hung or timed out got their `timeout` already.)
      if (hung_ && !kill_at_.count(id)) {
        run->outcome.kind = OutcomeKind::kInterrupted;
        run->outcome.error =
            "interrupted: the plugin host was killed because another task on it hung past "
            "its timeout";
      }
      run->done = true;
      run->cv.notify_one();
    }
    pending_.clear();
    kill_at_.clear();
  }
  cv_.notify_all();
}

}  // namespace cortex
