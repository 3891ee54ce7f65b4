#include "cortex/experts.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <future>
#include <iterator>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include <fmt/ranges.h>

#include "cortex/log.h"
#include "cortex/plugin.h"
#include "host_process.h"
#include "plugin_library.h"

namespace cortex {

namespace fs = std::filesystem;

// A plugin file the registry accepted: its manifest and the private copy hosts load
// (kept while any instance of it may restart). In-process, the library itself.
struct PluginFile {
  Manifest manifest;
  std::string file;                    // the user's file
  std::string copy;                    // the private copy (isolated mode)
  std::unique_ptr<PluginLibrary> lib;  // in-process mode only
  HostOptions host;                    // how its hosts start (isolated mode)
  ~PluginFile() {
    if (!copy.empty()) ::unlink(copy.c_str());
  }
};

struct ExpertRegistry::FileRecord {
  FileInfo sig;
  std::string plugin;   // set when loaded
  std::string refused;  // set when refused
};

namespace {

Env* ClockOf(const Supervision& s) { return s.clock ? s.clock : Env::Default(); }

bool SameFile(const FileInfo& a, const FileInfo& b) {
  return a.inode == b.inode && a.mtime_ns == b.mtime_ns && a.size == b.size && a.mode == b.mode &&
         a.uid == b.uid;
}

// Copies `fd` (already judged) to a new file `dst`, mode 0700, that nobody else can change.
Status CopyFromFd(int fd, const std::string& src, const std::string& dst) {
  int out = ::open(dst.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0700);
  if (out < 0) return Status::IOError("cannot create " + dst + ": " + std::strerror(errno));
  char buf[1 << 16];
  Status st;
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      st = Status::IOError("cannot read " + src + ": " + std::strerror(errno));
      break;
    }
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = ::write(out, buf + off, static_cast<size_t>(n - off));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        st = Status::IOError("cannot write " + dst + ": " + std::strerror(errno));
        break;
      }
      off += w;
    }
    if (!st.ok()) break;
  }
  if (::close(out) != 0 && st.ok())
    st = Status::IOError("cannot write " + dst + ": " + std::strerror(errno));
  if (!st.ok()) ::unlink(dst.c_str());
  return st;
}

ExpertInfo InfoOf(const Expert& e, const std::string& state) {
  ExpertInfo i;
  i.name = e.name();
  i.version = e.manifest().version;
  i.plugin = e.plugin();
  i.file = e.file();
  i.health = e.health();
  i.state = state == "active" ? i.health.state : state;
  i.description = e.manifest().description;
  i.keywords = e.manifest().keywords;
  i.inflight = e.inflight();
  i.capacity = e.manifest().capacity;
  i.timeout_s = e.manifest().timeout_s;
  i.isolation = e.isolated() ? "process" : "in-process";
  i.host_pid = e.host_pid();
  i.memory_limit = e.memory_limit();
  return i;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Health: crash events, backoff and quarantine. Shared with host death callbacks, which
// may outlive a wait on the expert.

class HealthState {
 public:
  HealthState(Supervision policy, std::function<void(const std::string&, const std::string&)> audit)
      : policy_(policy), audit_(std::move(audit)), clock_(ClockOf(policy)) {}

  // A crash event: a host died, or the plugin reported that what it ran crashed.
  void Crash(const std::string& why) {
    std::string event, detail;
    {
      std::lock_guard<std::mutex> l(mu_);
      ++consecutive_;
      ++crashes_;
      last_crash_ = why;
      last_crash_at_ = clock_->NowUnix();
      if (consecutive_ >= policy_.quarantine_after && !quarantined_) {
        quarantined_ = true;
        quarantined_at_ = last_crash_at_;
        event = "quarantined";
        detail = fmt::format("{} consecutive crashes, the last: {}", consecutive_, why);
      } else {
        double backoff =
            std::min(policy_.backoff_max_s,
                     policy_.backoff_s * std::pow(2.0, std::min(consecutive_ - 1, 30)));
        restart_at_ = clock_->MonotonicMicros() + static_cast<int64_t>(backoff * 1e6);
        // Every crash is an audit event (cortexctl events, the report's timeline); the
        // one that quarantines says so instead.
        event = "crash";
        detail = why;
      }
    }
    if (!event.empty() && audit_) audit_(event, detail);
  }
  // Every finished attempt: keeps the recent crash rate; anything but a crash or a
  // timeout breaks a run of consecutive crashes (a plugin that hangs every task, its
  // host killed each time, is quarantined like one that crashes).
  void Completed(OutcomeKind kind) {
    std::lock_guard<std::mutex> l(mu_);
    crash_rate_ = 0.8 * crash_rate_ + 0.2 * (kind == OutcomeKind::kCrash ? 1.0 : 0.0);
    if (kind != OutcomeKind::kCrash && kind != OutcomeKind::kTimeout) consecutive_ = 0;
  }
  void Restarted() {
    std::lock_guard<std::mutex> l(mu_);
    ++restarts_;
  }
  Status Release() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!quarantined_) return Status::FailedPrecondition("it is not quarantined");
      quarantined_ = false;
      consecutive_ = 0;
      crash_rate_ = 0;
      restart_at_ = 0;
    }
    if (audit_) audit_("released", "quarantine lifted by request");
    return Status::OK();
  }
  bool quarantined() const {
    std::lock_guard<std::mutex> l(mu_);
    return quarantined_;
  }
  int64_t restart_at() const {
    std::lock_guard<std::mutex> l(mu_);
    return restart_at_;
  }
  ExpertHealth Get(bool restarting) const {
    std::lock_guard<std::mutex> l(mu_);
    ExpertHealth h;
    const int64_t wait = restart_at_ - clock_->MonotonicMicros();
    h.state = quarantined_ ? "quarantined" : (restarting && wait > 0 ? "restarting" : "active");
    h.retry_in_s = h.state == "restarting" ? wait / 1e6 : 0;
    h.consecutive_crashes = consecutive_;
    h.crashes = crashes_;
    h.restarts = restarts_;
    h.crash_rate = crash_rate_;
    h.last_crash = last_crash_;
    h.last_crash_at = last_crash_at_;
    h.quarantined_at = quarantined_ ? quarantined_at_ : 0;
    return h;
  }
  const Supervision& policy() const { return policy_; }

 private:
  const Supervision policy_;
  const std::function<void(const std::string&, const std::string&)> audit_;
  Env* const clock_;
  mutable std::mutex mu_;
  int consecutive_ = 0;
  long crashes_ = 0, restarts_ = 0;
  double crash_rate_ = 0;
  std::string last_crash_;
  double last_crash_at_ = 0, quarantined_at_ = 0;
  bool quarantined_ = false;
  int64_t restart_at_ = 0;  // monotonic micros: no host start before this
};

// Capacity slots. Shared with a host's completion callbacks: a slot is freed when the
// plugin is done with the task (or its host is gone), not when the caller stops waiting.
struct Expert::Slots {
  Slots(int capacity, std::function<void()> on_free, Env* clock)
      : capacity(capacity), on_free(std::move(on_free)), clock(clock) {}
  bool TryAcquire() {
    std::lock_guard<std::mutex> l(mu);
    if (inflight.load() >= capacity) return false;
    ++inflight;
    return true;
  }
  bool Acquire(int64_t deadline_us, const std::atomic<bool>* stopping) {
    std::unique_lock<std::mutex> l(mu);
    while (inflight.load() >= capacity) {
      if (stopping && stopping->load()) return false;
      int64_t left = deadline_us - clock->MonotonicMicros();
      if (left <= 0) return false;
      cv.wait_for(l, std::chrono::microseconds(std::min<int64_t>(left, 100000)));
    }
    ++inflight;
    return true;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> l(mu);
      --inflight;
    }
    cv.notify_one();
    if (on_free) on_free();
  }
  const int capacity;
  const std::function<void()> on_free;
  Env* const clock;
  std::atomic<int> inflight{0};
  std::mutex mu;
  std::condition_variable cv;
};

// ---------------------------------------------------------------------------------------
// Expert

Expert::Expert(std::shared_ptr<PluginFile> file, Manifest manifest, std::string plugin,
               std::string settings, std::string fingerprint, Supervision supervision,
               std::function<void(const std::string&, const std::string&)> audit)
    : file_(std::move(file)),
      manifest_(std::move(manifest)),
      plugin_(std::move(plugin)),
      settings_(std::move(settings)),
      fingerprint_(std::move(fingerprint)),
      clock_(ClockOf(supervision)),
      slots_(std::make_shared<Slots>(manifest_.capacity, supervision.on_slot_free, clock_)),
      health_(std::make_shared<HealthState>(supervision, std::move(audit))) {}

Expert::~Expert() {
  if (instance_) file_->lib->api()->destroy(instance_);
}

const std::string& Expert::file() const { return file_->file; }
bool Expert::isolated() const { return !file_->lib; }
int Expert::inflight() const { return slots_->inflight.load(); }
bool Expert::quarantined() const { return health_->quarantined(); }
Status Expert::Release() { return health_->Release(); }

double Expert::load() const {
  return std::min(1.0, static_cast<double>(inflight()) / std::max(1, manifest_.capacity));
}

std::shared_ptr<HostProcess> Expert::CurrentHost() const {
  std::lock_guard<std::mutex> l(host_mu_);
  return host_;
}

int Expert::host_pid() const {
  auto h = CurrentHost();
  return h && h->alive() ? h->pid() : 0;
}

size_t Expert::memory_limit() const {
  auto h = CurrentHost();
  return h ? h->memory_limit() : 0;
}

ExpertHealth Expert::health() const {
  auto h = CurrentHost();
  return health_->Get(isolated() && (!h || !h->alive()));
}

double Expert::health_penalty() const {
  ExpertHealth h = health();
  return h.state == "restarting" ? 1.0 : h.crash_rate;
}

Status Expert::StartHost(std::shared_ptr<HostProcess>* out) {
  HostOptions ho = file_->host;
  ho.label = "expert " + name();
  std::shared_ptr<HostProcess> host;
  Manifest seen;
  CORTEX_RETURN_IF_ERROR(HostProcess::Start(
      ho, [h = health_](const std::string& why) { h->Crash(why); }, &host, &seen));
  CORTEX_RETURN_IF_ERROR(host->Create(settings_, ho.start_timeout_s));
  *out = std::move(host);
  return Status::OK();
}

Status Expert::Start() {
  if (!isolated()) {
    char err[512] = {0};
    instance_ = file_->lib->api()->create(settings_.c_str(), err, sizeof err);
    if (!instance_)
      return Status::InvalidArgument(err[0] ? err : "the plugin refused these settings");
    return Status::OK();
  }
  std::shared_ptr<HostProcess> host;
  CORTEX_RETURN_IF_ERROR(StartHost(&host));
  std::lock_guard<std::mutex> r(restart_mu_);
  std::lock_guard<std::mutex> l(host_mu_);
  host_ = std::move(host);
  started_once_ = true;
  return Status::OK();
}

Status Expert::EnsureHost(int64_t deadline, const std::atomic<bool>* stopping,
                          std::shared_ptr<HostProcess>* out, OutcomeKind* kind) {
  // One restart at a time; readers of host_ (routing, `experts`) never wait for one.
  std::unique_lock<std::mutex> l(restart_mu_);
  *kind = OutcomeKind::kRejected;
  while (true) {
    if (auto h = CurrentHost(); h && h->alive()) {
      *out = std::move(h);
      return Status::OK();
    }
    if (health_->quarantined())
      return Status::Unavailable("quarantined after repeated crashes (cortexctl experts release " +
                                 name() + ")");
    if (stopping && stopping->load()) return Status::Unavailable("cortexd is stopping");
    const int64_t now = clock_->MonotonicMicros(), at = health_->restart_at();
    if (at <= now) break;
    if (at > deadline)
      return Status::Unavailable(
          fmt::format("restarting after a crash (next start in {:.1f}s)", (at - now) / 1e6));
    l.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(std::min<int64_t>(at - now, 100000)));
    l.lock();
  }
  std::shared_ptr<HostProcess> host;
  Status st = StartHost(&host);
  if (!st.ok()) {
    *kind = OutcomeKind::kCrash;
    health_->Crash("restart failed: " + st.message());
    return st.WithContext("restarting the plugin host");
  }
  if (started_once_) {
    health_->Restarted();
    LogInfo("expert {}: plugin host restarted (pid {})", name(), host->pid());
  }
  started_once_ = true;
  std::shared_ptr<HostProcess> old;
  {
    std::lock_guard<std::mutex> h(host_mu_);
    old = std::exchange(host_, host);
  }
  *out = std::move(host);
  return Status::OK();  // `old` (dead) is released here, outside host_mu_
}

// One attempt between Begin and Await: either ended already (it never reached the
// plugin) or running on a host or, in-process, on a thread of its own.
class Expert::Attempt {
 public:
  int64_t start = 0, deadline = 0;  // monotonic micros
  const std::atomic<bool>* stopping = nullptr;
  std::shared_ptr<const std::atomic<bool>> stop_owner;  // keeps *stopping (Begin's)
  std::optional<Outcome> ended;                         // set when it never began
  struct Later {  // run whole on a thread of its own (its host had to be started first)
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Outcome outcome;
  };
  std::shared_ptr<Later> later;
  std::shared_ptr<HostProcess> host;
  std::shared_ptr<HostProcess::PendingRun> run;
  struct Shared {  // in-process: what the plugin's thread and the caller share
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Execution exec;
    Shared(const Task& t, int64_t d) : exec(t, d) {}
  };
  std::shared_ptr<Shared> shared;
};

namespace {
Outcome Finish(Env* clock, OutcomeKind k, std::string err, int64_t start, std::string output = "") {
  Outcome out;
  out.kind = k;
  out.error = std::move(err);
  out.output = std::move(output);
  out.duration_s = (clock->MonotonicMicros() - start) / 1e6;
  return out;
}
std::string TimeoutMessage(double timeout_s) {
  return "no result within " + fmt::format("{:g}", timeout_s) + "s";
}
int64_t DeadlineUnixMs(Env* clock, double timeout_s) {
  return static_cast<int64_t>(clock->NowUnix() * 1000 + timeout_s * 1000);
}
}  // namespace

Outcome Expert::Run(const Task& task, const std::atomic<bool>* stopping) {
  Attempt a;
  a.stopping = stopping;
  a.start = clock_->MonotonicMicros();
  a.deadline = a.start + static_cast<int64_t>(manifest_.timeout_s * 1e6);
  // The timeout counts the wait for a slot too.
  if (!slots_->Acquire(a.deadline, stopping))
    return Finish(clock_, OutcomeKind::kRejected,
                  stopping && stopping->load()
                      ? "cortexd is stopping"
                      : "busy: all " + std::to_string(manifest_.capacity) + " slots in use",
                  a.start);
  if (isolated())  // (this caller may wait for a host to start)
    BeginHosted(task, &a, nullptr);
  else
    BeginInProcess(task, &a, nullptr);
  return Await(a);
}

bool Expert::TryAcquireSlot() { return slots_->TryAcquire(); }
void Expert::ReleaseSlot() { slots_->Release(); }

std::shared_ptr<Expert::Attempt> Expert::Begin(const Task& task,
                                               std::shared_ptr<const std::atomic<bool>> stopping,
                                               std::function<void()> on_ready) {
  auto a = std::make_shared<Attempt>();
  a->stopping = stopping.get();
  a->stop_owner = std::move(stopping);
  a->start = clock_->MonotonicMicros();
  a->deadline = a->start + static_cast<int64_t>(manifest_.timeout_s * 1e6);
  if (!isolated()) {
    BeginInProcess(task, a.get(), std::move(on_ready));
    return a;
  }
  if (auto h = CurrentHost(); h && h->alive()) {
    // This host, as checked: one that dies meanwhile must not make this thread wait out
    // a restart (EnsureHost would). Its death is counted; the task goes the slow way.
    a->host = h;
    a->run =
        h->Submit(task, DeadlineUnixMs(clock_, manifest_.timeout_s), [slots = slots_, on_ready] {
          slots->Release();
          if (on_ready) on_ready();
        });
    if (a->run) return a;
    a->host.reset();
  }
  // No host now: starting one may first wait out the restart backoff, and creating the
  // instance takes time. That is done, with the whole attempt, on a thread of its own.
  a->later = std::make_shared<Attempt::Later>();
  try {
    std::thread([self = shared_from_this(), a, task, on_ready = std::move(on_ready)]() mutable {
      Outcome o;
      {
        Attempt whole;
        whole.start = a->start, whole.deadline = a->deadline, whole.stopping = a->stopping;
        self->BeginHosted(task, &whole, nullptr);
        o = self->Await(whole);
      }
      // Let go of the expert (and its host) before saying it is done: after that, cortexd
      // may be tearing them down, and this thread must not be the one to end them.
      self.reset();
      {
        std::lock_guard<std::mutex> l(a->later->mu);
        a->later->outcome = std::move(o);
        a->later->done = true;
      }
      a->later->cv.notify_all();
      if (on_ready) on_ready();
    }).detach();
  } catch (const std::system_error& e) {
    slots_->Release();
    a->later.reset();
    a->ended = Finish(clock_, OutcomeKind::kFailure,
                      std::string("cannot start the expert: ") + e.what(), a->start);
  }
  return a;
}

struct Expert::SendTogether::Held {
  hostproto::FrameWriter::Batch batch;
};
Expert::SendTogether::SendTogether() : held_(std::make_unique<Held>()) {}
Expert::SendTogether::~SendTogether() = default;

bool Expert::Ready(const Attempt& a) const {
  if (a.later) {  // its thread keeps the deadline and the stop itself
    std::lock_guard<std::mutex> l(a.later->mu);
    return a.later->done;
  }
  if (a.ended || (a.stopping && a.stopping->load()) || clock_->MonotonicMicros() >= a.deadline)
    return true;
  if (a.run) return a.host->Done(*a.run);
  std::lock_guard<std::mutex> l(a.shared->mu);
  return a.shared->done;
}

Outcome Expert::Await(Attempt& a) {
  if (a.ended) return std::move(*a.ended);
  if (a.later) {
    std::unique_lock<std::mutex> l(a.later->mu);
    a.later->cv.wait(l, [&] { return a.later->done; });
    return std::move(a.later->outcome);
  }
  return isolated() ? AwaitHosted(&a) : AwaitInProcess(&a);
}

void Expert::BeginHosted(const Task& task, Attempt* a, std::function<void()> on_ready) {
  OutcomeKind kind;
  Status st = EnsureHost(a->deadline, a->stopping, &a->host, &kind);
  if (!st.ok()) {
    slots_->Release();
    if (kind == OutcomeKind::kCrash) health_->Completed(kind);
    a->ended = Finish(clock_, kind, st.message(), a->start);
    return;
  }
  a->run = a->host->Submit(task, DeadlineUnixMs(clock_, manifest_.timeout_s),
                           [slots = slots_, on_ready = std::move(on_ready)] {
                             slots->Release();
                             if (on_ready) on_ready();
                           });
  if (!a->run) {  // it died just now; its death is already counted
    slots_->Release();
    health_->Completed(OutcomeKind::kCrash);
    a->ended = Finish(clock_, OutcomeKind::kCrash, "the plugin host died before the task started",
                      a->start);
  }
}

Outcome Expert::AwaitHosted(Attempt* a) {
  if (!a->host->WaitRun(*a->run, a->deadline, a->stopping)) {
    a->host->Abandon(a->run, health_->policy().hang_grace_s);
    if (a->stopping && a->stopping->load())
      return Finish(clock_, OutcomeKind::kInterrupted, "cortexd is stopping", a->start);
    health_->Completed(OutcomeKind::kTimeout);
    return Finish(clock_, OutcomeKind::kTimeout, TimeoutMessage(manifest_.timeout_s), a->start);
  }
  Outcome out = a->run->outcome;
  out.duration_s = (clock_->MonotonicMicros() - a->start) / 1e6;
  // Its host was killed for another task's hang: nothing this expert did on this task, so
  // it counts neither way (the pipeline runs the task again).
  if (out.kind == OutcomeKind::kInterrupted) return out;
  // A crash the plugin reports (say, a program it ran died) is an event of its own; a
  // host death was counted once by the host's death callback, however many tasks it took.
  if (out.kind == OutcomeKind::kCrash && !a->run->host_died) health_->Crash(out.error);
  health_->Completed(out.kind);
  return out;
}

void Expert::BeginInProcess(const Task& task, Attempt* a, std::function<void()> on_ready) {
  a->shared = std::make_shared<Attempt::Shared>(task, DeadlineUnixMs(clock_, manifest_.timeout_s));
  // The plugin runs on its own thread so a hung plugin cannot hold the caller past its
  // deadline; the thread keeps the expert (and its library) alive until it returns.
  try {
    std::thread([self = shared_from_this(), st = a->shared, on_ready = std::move(on_ready)] {
      st->exec.Run(self->file_->lib->api(), self->instance_);
      {
        std::lock_guard<std::mutex> l(st->mu);
        st->done = true;
      }
      st->cv.notify_all();
      self->slots_->Release();
      if (on_ready) on_ready();
    }).detach();
  } catch (const std::system_error& e) {
    slots_->Release();
    a->ended = Finish(clock_, OutcomeKind::kFailure,
                      std::string("cannot start the expert: ") + e.what(), a->start);
  }
}

Outcome Expert::AwaitInProcess(Attempt* a) {
  Attempt::Shared* st = a->shared.get();
  std::unique_lock<std::mutex> l(st->mu);
  while (!st->done) {
    if (a->stopping && a->stopping->load()) {
      // The plugin is asked to stop; its thread keeps the slot until it returns.
      st->exec.Cancel();
      return Finish(clock_, OutcomeKind::kInterrupted, "cortexd is stopping", a->start);
    }
    int64_t left = a->deadline - clock_->MonotonicMicros();
    if (left <= 0) break;
    st->cv.wait_for(l, std::chrono::microseconds(std::min<int64_t>(left, 100000)));
  }
  if (!st->done) {
    st->exec.Cancel();
    health_->Completed(OutcomeKind::kTimeout);
    return Finish(clock_, OutcomeKind::kTimeout, TimeoutMessage(manifest_.timeout_s), a->start);
  }
  Outcome out = st->exec.TakeOutcome();
  out.duration_s = (clock_->MonotonicMicros() - a->start) / 1e6;
  if (out.kind == OutcomeKind::kCrash) health_->Crash(out.error);
  health_->Completed(out.kind);
  return out;
}

// ---------------------------------------------------------------------------------------
// ExpertRegistry

ExpertRegistry::ExpertRegistry(Options options) : options_(std::move(options)) {
  if (!options_.cache_dir.empty()) (void)options_.env->CreateDirs(options_.cache_dir, 0700);
}

ExpertRegistry::~ExpertRegistry() = default;

void ExpertRegistry::Audit(const std::string& expert, const std::string& file,
                           const std::string& event, const std::string& detail) {
  if (options_.log_events && event == "refused")
    LogWarn("plugin {}: refused: {}", file, detail);
  else if (options_.log_events)
    LogInfo("expert {} {} ({}){}", expert.empty() ? "?" : expert, event, file,
            detail.empty() ? "" : ": " + detail);
  if (options_.audit) options_.audit({options_.env->NowUnix(), expert, file, event, detail});
}

Status ExpertRegistry::CheckSafe(const std::string& path, bool is_dir) {
  FileInfo fi;
  CORTEX_RETURN_IF_ERROR(options_.env->Stat(path, &fi));
  if (!fi.exists) return Status::NotFound(path + " does not exist");
  CORTEX_RETURN_IF_ERROR(JudgeOwnership(path, is_dir, fi, options_.env->CurrentUid()));
  // The folders above it too: whoever may rename one could swap in a folder of their own.
  return CheckTrustedPath(path, is_dir);
}

// The file is opened once; what was opened is judged and copied. Checking the path and
// then opening it again would let a symlink flipped in between load another user's file.
Status ExpertRegistry::CopyChecked(const std::string& path, const std::string& dst,
                                   FileInfo* opened) {
  // O_NONBLOCK: a FIFO planted under a .so name must not hang the open.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) return Status::IOError("cannot open " + path + ": " + std::strerror(errno));
  std::string name = path;
  struct stat ls {};
  if (::lstat(path.c_str(), &ls) == 0 && S_ISLNK(ls.st_mode)) {
    char target[4096];
    ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), target, sizeof target);
    if (n > 0) name += " (a symlink to " + std::string(target, static_cast<size_t>(n)) + ")";
  }
  struct stat st {};
  Status result;
  if (::fstat(fd, &st) != 0) {
    result = Status::IOError("cannot stat " + name + ": " + std::strerror(errno));
  } else {
    *opened = FileInfoOf(st);
    result = JudgeOwnership(name, false, *opened, options_.env->CurrentUid());
  }
  if (result.ok()) {
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    result = CopyFromFd(fd, name, dst);
  }
  ::close(fd);
  return result;
}

Status ExpertRegistry::LoadFile(const std::string& path, std::shared_ptr<PluginFile>* out,
                                FileInfo* opened) {
  auto pf = std::make_shared<PluginFile>();
  pf->file = path;
  // Load a private copy: the original may be replaced or rewritten while we run it.
  static std::atomic<uint64_t> counter{0};
  std::string copy = options_.cache_dir + "/" + fs::path(path).filename().string() + "." +
                     std::to_string(::getpid()) + "." + std::to_string(++counter);
  CORTEX_RETURN_IF_ERROR(CopyChecked(path, copy, opened));
  if (options_.in_process) {
    Status st = PluginLibrary::Open(copy, path, &pf->lib);
    ::unlink(copy.c_str());  // the mapping stays valid; nothing to clean up later
    CORTEX_RETURN_IF_ERROR(st);
    pf->manifest = pf->lib->manifest();
  } else {
    pf->copy = copy;  // hosts load it, now and at every restart; removed with pf
    pf->host.exe = options_.host_exe;
    pf->host.library = copy;
    pf->host.display = path;
    pf->host.memory_limit = options_.supervision.memory_limit;
    pf->host.env_names = options_.host_env;
    pf->host.clock = options_.env;
    pf->host.start_timeout_s = options_.load_timeout_s;
    // A host of its own reads the manifest, so a plugin that crashes while loading
    // is refused without touching cortexd.
    std::shared_ptr<HostProcess> probe;
    CORTEX_RETURN_IF_ERROR(HostProcess::Start(pf->host, nullptr, &probe, &pf->manifest));
  }
  *out = std::move(pf);
  return Status::OK();
}

Status ExpertRegistry::NewExpert(const std::shared_ptr<PluginFile>& file, Manifest man,
                                 const std::string& plugin, const std::string& settings,
                                 const std::string& fingerprint, std::shared_ptr<Expert>* out) {
  const std::string name = man.name, path = file->file;
  auto audit = [this, name, path](const std::string& event, const std::string& detail) {
    Audit(name, path, event, detail);
  };
  Supervision sup = options_.supervision;
  sup.clock = options_.env;
  auto e =
      std::make_shared<Expert>(file, std::move(man), plugin, settings, fingerprint, sup, audit);
  CORTEX_RETURN_IF_ERROR(e->Start());
  *out = std::move(e);
  return Status::OK();
}

void ExpertRegistry::Rescan() {
  std::lock_guard<std::mutex> l(mu_);
  std::set<std::string> seen;
  bool changed = false;
  struct Loaded {
    Status st;
    std::shared_ptr<PluginFile> lib;
    FileInfo opened;
  };
  struct Pending {
    std::string path;
    bool replacing;
    std::future<Loaded> result;
  };
  std::vector<Pending> loads;
  for (const auto& dir : options_.dirs) {
    FileInfo di;
    if (!options_.env->Stat(dir, &di).ok() || !di.exists) continue;
    Status safe = CheckSafe(dir, true);
    if (!safe.ok()) {
      // Everything in an unsafe folder is treated as absent; say so once per state.
      auto& rec = files_[dir];
      if (!rec) rec = std::make_unique<FileRecord>();
      if (!SameFile(rec->sig, di) || rec->refused.empty()) {
        rec->sig = di;
        rec->refused = safe.message();
        Audit("", dir, "refused", safe.message());
      }
      seen.insert(dir);
      continue;
    }
    files_.erase(dir);
    std::vector<std::string> names;
    if (!options_.env->ListDir(dir, &names).ok()) continue;
    std::sort(names.begin(), names.end());
    for (const auto& n : names) {
      if (n.size() < 4 || n.compare(n.size() - 3, 3, ".so") != 0) continue;
      if (dir == options_.core_only_dir &&
          std::find(std::begin(kCorePlugins), std::end(kCorePlugins), n) == std::end(kCorePlugins))
        continue;
      std::string path = dir + "/" + n;
      FileInfo fi;
      if (!options_.env->Stat(path, &fi).ok() || !fi.exists) continue;
      seen.insert(path);
      auto& rec = files_[path];
      if (rec && SameFile(rec->sig, fi)) continue;
      bool replacing = rec && !rec->plugin.empty();
      if (replacing) plugins_.erase(rec->plugin);
      rec = std::make_unique<FileRecord>();
      rec->sig = fi;
      changed = true;
      // Loaded side by side (each in a host of its own, bounded by the load timeout), so
      // a plugin whose constructor hangs delays the others by nothing.
      loads.push_back({path, replacing, std::async(std::launch::async, [this, path] {
                         Loaded r;
                         r.st = LoadFile(path, &r.lib, &r.opened);
                         return r;
                       })});
    }
  }
  for (auto& ld : loads) {  // in scan order, so which duplicate wins stays the same
    Loaded r = ld.result.get();
    FileRecord& rec = *files_[ld.path];
    // What was loaded (or refused) is the file that was opened, which a symlink flipped
    // since the Stat above may have made another one: remember that one.
    if (r.opened.exists) rec.sig = r.opened;
    if (r.st.ok()) {
      auto dup = plugins_.find(r.lib->manifest.name);
      if (dup != plugins_.end())
        r.st = Status::AlreadyExists("a plugin named '" + r.lib->manifest.name +
                                     "' is already loaded from " + dup->second->file);
    }
    if (!r.st.ok()) {
      rec.refused = r.st.message();
      Audit(r.lib ? r.lib->manifest.name : "", ld.path, "refused", r.st.message());
      continue;
    }
    rec.plugin = r.lib->manifest.name;
    Audit(r.lib->manifest.name, ld.path, ld.replacing ? "replaced" : "loaded",
          "plugin " + r.lib->manifest.name + " " + r.lib->manifest.version);
    plugins_[r.lib->manifest.name] = std::move(r.lib);
  }
  for (auto it = files_.begin(); it != files_.end();) {
    if (seen.count(it->first)) {
      ++it;
      continue;
    }
    if (!it->second->plugin.empty()) {
      Audit(it->second->plugin, it->first, "removed", "file disappeared");
      plugins_.erase(it->second->plugin);
      changed = true;
    }
    it = files_.erase(it);
  }
  if (changed) RebuildLocked();
}

Status ExpertRegistry::BuildInstances(const std::vector<ExpertConfig>& instances,
                                      const std::string& source,
                                      std::map<std::string, std::shared_ptr<Expert>>* out) {
  std::vector<std::string> errors;  // every instance is tried: all their errors at once
  for (size_t i = 0; i < instances.size(); ++i) {
    const ExpertConfig& ec = instances[i];
    const std::string path = "experts[" + std::to_string(ec.index) + "]";
    auto where = [&](int line) { return source + ":" + std::to_string(line) + ": "; };
    auto pit = plugins_.find(ec.plugin);
    if (pit == plugins_.end()) {
      std::string have;
      for (const auto& [n, _] : plugins_) have += (have.empty() ? "" : ", ") + n;
      errors.push_back(where(ec.line) + path + ".plugin: no plugin named '" + ec.plugin +
                       "' is loaded (loaded: " + (have.empty() ? "none" : have) + ")");
      continue;
    }
    const auto& lib = pit->second;
    std::set<std::string> accepted(lib->manifest.config_keys.begin(),
                                   lib->manifest.config_keys.end());
    bool bad_key = false;
    for (const auto& [k, _] : ec.settings.items()) {
      if (accepted.count(k)) continue;
      std::string list;
      for (const auto& a : accepted) list += (list.empty() ? "" : ", ") + a;
      bad_key = true;
      errors.push_back(where(ec.key_lines.count(k) ? ec.key_lines.at(k) : ec.line) + path + "." +
                       k + ": unknown key for plugin '" + ec.plugin +
                       "' (accepted: name, plugin, description, keywords, examples, "
                       "capacity, timeout" +
                       (list.empty() ? "" : ", " + list) + ")");
    }
    if (bad_key) continue;
    // Reuse a live instance with identical settings, so in-flight counts carry over.
    auto cur = active_.find(ec.name);
    Manifest man = lib->manifest;
    man.name = ec.name;
    if (ec.description) man.description = *ec.description;
    if (ec.keywords) man.keywords = *ec.keywords;
    if (ec.examples) man.examples = *ec.examples;
    if (ec.capacity) man.capacity = *ec.capacity;
    if (ec.timeout_s) man.timeout_s = *ec.timeout_s;
    std::string settings = ec.settings.dump();
    std::string fp =
        fmt::format("{}|{}|{}|{}|{}|{}|{}|{}", static_cast<const void*>(lib.get()), settings,
                    man.description, fmt::join(man.keywords, "\x1f"),
                    fmt::join(man.examples, "\x1f"), man.capacity, man.timeout_s, ec.plugin);
    if (cur != active_.end() && cur->second->fingerprint() == fp) {
      (*out)[ec.name] = cur->second;
      continue;
    }
    std::shared_ptr<Expert> e;
    Status st = NewExpert(lib, std::move(man), ec.plugin, settings, fp, &e);
    if (!st.ok()) {
      std::string msg = st.message();
      int line = ec.line;
      std::string key;
      if (size_t c = msg.find(':'); st.code() == Status::Code::kInvalidArgument &&
                                    c != std::string::npos &&
                                    ec.key_lines.count(msg.substr(0, c))) {
        key = msg.substr(0, c);
        line = ec.key_lines.at(key);
        msg = msg.substr(c + 1);
        while (!msg.empty() && msg[0] == ' ') msg.erase(0, 1);
      }
      errors.push_back(where(line) + path + (key.empty() ? "" : "." + key) + ": " + msg);
      continue;
    }
    (*out)[ec.name] = std::move(e);
  }
  if (!errors.empty()) return Status::InvalidArgument(JoinLines(errors));
  return Status::OK();
}

Status ExpertRegistry::Configure(const Config& config) {
  std::lock_guard<std::mutex> l(mu_);
  std::map<std::string, std::shared_ptr<Expert>> trial;
  CORTEX_RETURN_IF_ERROR(BuildInstances(config.experts, config.source, &trial));
  instances_ = config.experts;
  instances_source_ = config.source;
  RebuildLocked(&trial);
  return Status::OK();
}

void ExpertRegistry::RebuildLocked(std::map<std::string, std::shared_ptr<Expert>>* prebuilt) {
  std::map<std::string, std::shared_ptr<Expert>> next;
  std::set<std::string> configured;
  for (const auto& ec : instances_) configured.insert(ec.name);
  // New default instances start side by side: a plugin slow to create() delays the
  // others by nothing.
  struct Starting {
    std::string name;
    std::shared_ptr<PluginFile> lib;
    std::future<std::pair<Status, std::shared_ptr<Expert>>> result;
  };
  std::vector<Starting> starting;
  for (const auto& [name, lib] : plugins_) {
    if (lib->manifest.requires_config || configured.count(name)) continue;
    const std::string fp = fmt::format("{}|default", static_cast<const void*>(lib.get()));
    auto cur = active_.find(name);
    if (cur != active_.end() && cur->second->fingerprint() == fp) {
      next[name] = cur->second;
      continue;
    }
    // (Named copies: clang before 16 cannot capture structured bindings.)
    std::string n = name;
    std::shared_ptr<PluginFile> file = lib;
    starting.push_back({n, file, std::async(std::launch::async, [this, n, file, fp] {
                          std::shared_ptr<Expert> e;
                          Status st = NewExpert(file, file->manifest, n, "{}", fp, &e);
                          return std::make_pair(st, e);
                        })});
  }
  for (auto& s : starting) {
    auto [st, e] = s.result.get();
    if (!st.ok()) {
      Audit(s.name, s.lib->file, "refused", "default instance: " + st.message());
      continue;
    }
    next[s.name] = std::move(e);
  }
  // Configured instances one by one: one that no longer builds (its plugin vanished or
  // changed) is listed as removed without taking the others down.
  for (size_t i = 0; i < instances_.size(); ++i) {
    if (prebuilt && prebuilt->count(instances_[i].name)) {  // just built by Configure
      next[instances_[i].name] = (*prebuilt)[instances_[i].name];
      continue;
    }
    std::map<std::string, std::shared_ptr<Expert>> one;
    Status st = BuildInstances({instances_[i]}, instances_source_, &one);
    if (!st.ok()) {
      if (active_.count(instances_[i].name) || !removed_.count(instances_[i].name))
        Audit(instances_[i].name, "", "unavailable", st.message());
      ExpertInfo info;
      info.name = instances_[i].name;
      info.plugin = instances_[i].plugin;
      info.state = "removed";
      std::lock_guard<std::mutex> st_l(state_mu_);
      removed_[info.name] = info;
      continue;
    }
    next.insert(one.begin(), one.end());
  }
  bool changed = next.size() != active_.size();
  std::lock_guard<std::mutex> st_l(state_mu_);  // publish: readers see all or nothing
  for (const auto& [name, e] : active_) {
    auto it = next.find(name);
    if (it == next.end() || it->second != e) changed = true;
    if (it == next.end()) removed_[name] = InfoOf(*e, "removed");
  }
  for (const auto& [name, _] : next) removed_.erase(name);
  active_ = std::move(next);
  if (changed) ++generation_;
}

std::vector<std::shared_ptr<Expert>> ExpertRegistry::Active() const {
  std::lock_guard<std::mutex> l(state_mu_);
  std::vector<std::shared_ptr<Expert>> out;
  for (const auto& [_, e] : active_)
    if (!e->quarantined()) out.push_back(e);
  return out;
}

Status ExpertRegistry::Release(const std::string& name) {
  std::shared_ptr<Expert> e;
  {
    std::lock_guard<std::mutex> l(state_mu_);
    auto it = active_.find(name);
    if (it == active_.end())
      return Status::NotFound("no expert named '" + Printable(name) + "' is loaded");
    e = it->second;
  }
  return e->Release().WithContext("expert " + name);
}

std::shared_ptr<Expert> ExpertRegistry::Find(const std::string& name) const {
  std::lock_guard<std::mutex> l(state_mu_);
  auto it = active_.find(name);
  return it == active_.end() ? nullptr : it->second;
}

std::vector<ExpertInfo> ExpertRegistry::List() const {
  std::lock_guard<std::mutex> l(state_mu_);
  std::vector<ExpertInfo> out;
  for (const auto& [_, e] : active_) out.push_back(InfoOf(*e, "active"));
  for (const auto& [_, i] : removed_) out.push_back(i);
  return out;
}

}  // namespace cortex
