#include "cortex/daemon.h"

#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <unordered_set>

#include "cortex/experts.h"
#include "cortex/learner.h"
#include "cortex/log.h"
#include "cortex/paths.h"
#include "cortex/router.h"
#include "cortex/store.h"
#include "cortex/wire.h"
#include "crash_marker.h"
#include "notify.h"
#include "server.h"

namespace cortex {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
// lib/cortex/<name> of the install (or build) tree the running executable is in.
fs::path BesideExe(const std::string& name) {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return {};
  return (exe.parent_path().parent_path() / "lib" / "cortex" / name).lexically_normal();
}

// Removes private plugin copies left by daemons that were killed (their pid is gone).
void RemoveStalePluginCaches(const fs::path& dir) {
  std::error_code ec;
  for (const auto& d : fs::directory_iterator(dir, ec)) {
    const std::string n = d.path().filename().string();
    if (n.rfind("plugin-cache.", 0) != 0) continue;
    const std::string pid = n.substr(13);
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (fs::exists("/proc/" + pid, ec)) continue;  // its daemon still runs
    fs::remove_all(d.path(), ec);
  }
}
}  // namespace

std::string BundledPluginDir() {
  std::error_code ec;
  fs::path dir = BesideExe("plugins");
  return !dir.empty() && fs::is_directory(dir, ec) ? dir.string() : "";
}

std::string BundledPluginHost() {
  std::error_code ec;
  fs::path exe = BesideExe("cortex-plugin-host");
  return !exe.empty() && fs::is_regular_file(exe, ec) ? exe.string() : "";
}

namespace {

// Rules that name an expert which is not loaded, for a start's, a reload's and
// --check-config's warnings: each such expert, the rules naming it ("'gdpr' (line 12)"),
// and what they do meanwhile (a force rule holds the tasks it matches; a boost does
// nothing).
struct MissingRuleExpert {
  std::string expert, rules, effect;
};
std::vector<MissingRuleExpert> RuleExpertsMissing(
    const Config& c, const std::function<bool(const std::string&)>& loaded) {
  std::map<std::string, MissingRuleExpert> named;
  std::map<std::string, bool> forced;
  for (const auto& r : c.rules) {
    if (loaded(r.expert)) continue;
    MissingRuleExpert& m = named[r.expert];
    m.expert = r.expert;
    m.rules += (m.rules.empty() ? "" : ", ") + fmt::format("'{}'", r.name) +
               (r.line ? fmt::format(" (line {})", r.line) : "");
    forced[r.expert] |= r.force;
  }
  std::vector<MissingRuleExpert> out;
  for (auto& [name, m] : named) {
    m.effect = forced[name] ? "the tasks its force rule matches wait until it is loaded"
                            : "its rules fire once it is loaded";
    out.push_back(std::move(m));
  }
  return out;
}

// The registry's options from a config: the same for a start and for --check-config.
Status RegistryOptionsFor(const Config& c, const DaemonOptions& o, ExpertRegistry::Options* ro) {
  std::string bundled = o.bundled_plugin_dir.empty() ? BundledPluginDir() : o.bundled_plugin_dir;
  if (c.plugins.bundled) {
    if (bundled.empty())
      LogWarn("no bundled plugin folder next to the executable");
    else
      ro->dirs.push_back(bundled);
  }
  ro->dirs.push_back(c.plugins.dir);
  ro->in_process = c.plugins.isolation == "in-process";
  ro->host_exe = o.plugin_host.empty() ? BundledPluginHost() : o.plugin_host;
  if (!ro->in_process && ro->host_exe.empty())
    return Status::FailedPrecondition(
        "cannot find cortex-plugin-host next to cortexd (expected " +
        BesideExe("cortex-plugin-host").string() +
        "); reinstall Cortex, or set plugins.isolation: in-process to run trusted plugins "
        "inside cortexd");
  ro->host_env = c.plugins.env;
  ro->load_timeout_s = c.plugins.load_timeout_s;
  ro->supervision.quarantine_after = c.plugins.quarantine_after;
  ro->supervision.backoff_s = c.plugins.restart_backoff_s;
  ro->supervision.memory_limit = c.plugins.memory_limit;
  return Status::OK();
}

// A connection's thread routes and runs tasks too: it gets its signal stack on first use.
void CrashStackOnce() {
  static thread_local const bool kDone = (UseCrashStackOnThisThread(), true);
  (void)kDone;
}

struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
};

struct Job {
  Task task;
  Decision decision;
  size_t next = 0;          // the candidate to try next
  int attempts = 0;         // attempts made so far
  std::string last_expert;  // whose attempt came last
  uint64_t generation = 0;  // of the registry when it was routed
  bool cancel = false;      // `cortexctl cancel`: ends cancelled instead of running
  // Set when its first attempt was recorded at admission, on a slot already taken for
  // this expert: a worker runs it next (started_), nothing more is written first.
  std::shared_ptr<Expert> held;
};

// A submit in the intake queue: its task, and once its batch is stored, the result.
struct Intake {
  Task task;
  double wait_s = -1;  // how long its submitter waits for the end (< 0: it does not)
  Status result;
  std::optional<Job> run_here;  // started for the submitter's own thread to run
  // As the store's writers: kWait until its batch is stored (kDone) or it is handed the
  // lead (kLead), woken on its own mutex.
  enum State { kWait, kLead, kDone } state = kWait;
  std::mutex m;
  std::condition_variable cv;
};

// The settings a reload applies to the running daemon, each with how it is copied into
// the settings in force; every other setting takes effect after a restart.
using LiveSetting = void (*)(Config* running, const Config& next);
const std::map<std::string, LiveSetting>& LiveSettings() {
#define CORTEX_LIVE(key, field)                                 \
  {                                                             \
    key, [](Config* r, const Config& n) { r->field = n.field; } \
  }
  static const std::map<std::string, LiveSetting> kLive = {
      CORTEX_LIVE("router.exploration", router.exploration),
      CORTEX_LIVE("router.load_bias", router.load_bias),
      CORTEX_LIVE("router.health_bias", router.health_bias),
      CORTEX_LIVE("router.max_attempts", router.max_attempts),
      CORTEX_LIVE("router.seed", router.seed),
      CORTEX_LIVE("training.interval", training.interval_s),
      CORTEX_LIVE("training.min_new_outcomes", training.min_new_outcomes),
      CORTEX_LIVE("daemon.shutdown_grace", daemon.shutdown_grace_s),
      CORTEX_LIVE("daemon.max_queued", daemon.max_queued),
  };
#undef CORTEX_LIVE
  return kLive;
}

class DaemonImpl : public Daemon, public RequestHandler {
 public:
  DaemonImpl(Config config, DaemonOptions options)
      : config_(std::move(config)), options_(std::move(options)), env_(options_.env) {}

  ~DaemonImpl() override {
    {  // a slot freed from now on (a host torn down below, a late plugin thread) wakes nobody
      std::lock_guard<std::mutex> l(slot_waker_->mu);
      slot_waker_->cv = nullptr;
    }
    if (lock_fd_ >= 0) {
      SetCrashMarkerFd(-1);
      close(lock_fd_);
    }
    if (inotify_fd_ >= 0) close(inotify_fd_);
    if (signal_fd_ >= 0) close(signal_fd_);
    // The plugin copies go with the hosts that ran them.
    registry_.reset();
    if (!cache_dir_.empty()) {
      std::error_code ec;
      fs::remove_all(cache_dir_, ec);
    }
  }

  Status Start() override {
    start_mono_ = env_->MonotonicMicros();
    running_ = config_;
    shutdown_grace_s_ = config_.daemon.shutdown_grace_s;
    max_queued_ = config_.daemon.max_queued;
    // The socket folder also holds the plugin cache: it is made (or checked) private
    // before anything is put in it, so no other user can plant or swap a file there.
    CORTEX_RETURN_IF_ERROR(
        env_->MakePrivateDir(fs::path(config_.daemon.socket).parent_path().string(), true)
            .WithContext("daemon.socket"));
    CORTEX_RETURN_IF_ERROR(PrepareStore());
    CORTEX_RETURN_IF_ERROR(PrepareRouting());
    CORTEX_RETURN_IF_ERROR(Recover());
    server_ = std::make_unique<Server>(
        this, ServerLimits{config_.daemon.max_connections, config_.daemon.max_request_bytes,
                           config_.daemon.allow_group, config_.daemon.idle_timeout_s});
    CORTEX_RETURN_IF_ERROR(server_->Listen(config_.daemon.socket));
    SetupInotify();
    dispatcher_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "dispatcher");
      DispatchLoop();
    });
    loader_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "loader");
      LoadLoop();
    });
    trainer_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "trainer");
      // Learning trails the pipeline under load: the trainer takes what CPU the tasks
      // leave (it catches up on every outcome the store logged), not theirs.
      setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 10);
      TrainLoop();
    });
    for (int i = 0; i < config_.daemon.workers; ++i)
      workers_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "worker");
        WorkerLoop();
      });
    LogInfo("cortexd ready: config {}, socket {}, store {}, {} experts, {} workers, backend {}",
            config_.source, config_.daemon.socket, config_.store.path, registry_->Active().size(),
            config_.daemon.workers, CurrentRouter()->backend());
    return Status::OK();
  }

  Status Run() override {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    signal_fd_ = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    int64_t rescan_at = 0;  // debounced inotify rescan, monotonic micros
    while (!stop_.load()) {
      struct pollfd p[3];
      int n = 0;
      p[n++] = {server_->listen_fd(), POLLIN, 0};
      if (signal_fd_ >= 0) p[n++] = {signal_fd_, POLLIN, 0};
      if (inotify_fd_ >= 0) p[n++] = {inotify_fd_, POLLIN, 0};
      int timeout = 250;
      if (rescan_at)
        timeout = static_cast<int>(
            std::clamp<int64_t>((rescan_at - env_->MonotonicMicros()) / 1000, 0, 250));
      int r = poll(p, static_cast<nfds_t>(n), timeout);
      if (r < 0 && errno != EINTR) return Status::IOError(std::string("poll: ") + strerror(errno));
      for (int i = 0; i < n && r > 0; ++i) {
        if (!p[i].revents) continue;
        if (p[i].fd == server_->listen_fd())
          server_->AcceptOne();
        else if (p[i].fd == signal_fd_)
          HandleSignal();
        else if (p[i].fd == inotify_fd_) {
          char buf[4096];
          while (read(inotify_fd_, buf, sizeof buf) > 0) {
          }
          if (!rescan_at) rescan_at = env_->MonotonicMicros() + 200000;
        }
      }
      if (rescan_at && env_->MonotonicMicros() >= rescan_at) {
        rescan_at = 0;
        RequestLoad(false);
      }
    }
    Shutdown();
    return Status::OK();
  }

  void RequestStop() override {
    stop_ = true;
    queue_cv_.notify_all();
    work_cv_.notify_all();
    train_cv_.notify_all();
  }

  // ---- RequestHandler (called from connection threads) -----------------------------

  const DaemonConfig& limits() const override { return config_.daemon; }

  Status Submit(const std::string& text, const Tags& tags, double wait_s,
                std::string* id) override {
    if (stop_.load()) return Status::Unavailable("cortexd is stopping; submit again after restart");
    {
      // Every task not yet running counts, wherever it is: queued, being routed, routed
      // and waiting for a slot, or being stored by another submit right now.
      std::lock_guard<std::mutex> l(queue_mu_);
      const size_t waiting =
          queue_.size() + ready_.size() + started_.size() + routing_ + admitting_;
      if (waiting >= max_queued_.load())
        return Status::ResourceExhausted(
            fmt::format("the queue is full ({} tasks waiting, daemon.max_queued); try again "
                        "once some have run",
                        waiting));
      ++admitting_;  // its place is held until it is stored (the leader gives it back)
    }
    Intake me;
    me.wait_s = wait_s;
    me.task.text = text;
    me.task.tags = tags;
    me.task.state = TaskState::kQueued;
    me.task.created_at = me.task.updated_at = env_->NowUnix();
    for (int tries = 0;; ++tries) {
      me.task.id = NewId();
      me.state = Intake::kWait;
      {
        // Group admission, as the store's group commit: the submit at the front of the
        // intake routes and stores every task queued behind it in one batch.
        std::lock_guard<std::mutex> l(intake_mu_);
        intake_.push_back(&me);
        if (intake_.front() == &me) me.state = Intake::kLead;  // nobody leads now
      }
      Intake::State st;
      {
        std::unique_lock<std::mutex> l(me.m);
        me.cv.wait(l, [&] { return me.state != Intake::kWait; });
        st = me.state;
      }
      if (st == Intake::kLead) LeadIntake();
      if (me.result.ok()) break;
      NoteStoreFailure(me.result);
      if (tries >= 3 || stop_.load()) {
        std::lock_guard<std::mutex> l(queue_mu_);
        --admitting_;
        return me.result.WithContext("storing the task (not acknowledged)");
      }
    }
    *id = me.task.id;
    if (me.run_here) {
      // Its submitter waits anyway: the first attempt runs on this thread, with no hand-off
      // to a worker and back. It counts as a worker's for the stop's grace period.
      CrashStackOnce();  // a crash while it runs must reach the marker's handler
      Job job = std::move(*me.run_here);
      std::shared_ptr<Expert> expert = std::move(job.held);
      RunAttempt(std::move(job), expert, /*recorded=*/true);
      {
        std::lock_guard<std::mutex> l(queue_mu_);
        --busy_workers_;
      }
      if (stop_.load()) queue_cv_.notify_all();
    }
    return Status::OK();
  }

  Status Route(const std::string& text, const Tags& tags, Decision* d) override {
    std::vector<ExpertSlot> slots = Slots(nullptr);
    std::vector<Decision> out;
    CORTEX_RETURN_IF_ERROR(
        CurrentRouter()->Route({{text, tags}}, slots, /*explore=*/false, env_->NowUnix(), &out));
    *d = std::move(out.front());
    return Status::OK();
  }

  Status Cancel(const std::string& id) override {
    std::vector<Job> ended;  // taken out of the queues: they end here, not on a worker
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      for (auto it = queue_.begin(); it != queue_.end(); ++it)
        if (it->id == id) {
          Job j;
          j.task = std::move(*it);
          queue_.erase(it);
          ended.push_back(std::move(j));
          break;
        }
      for (auto it = ready_.begin(); ended.empty() && it != ready_.end(); ++it)
        if (it->task.id == id) {
          ended.push_back(std::move(*it));
          ready_.erase(it);
          break;
        }
      if (ended.empty()) {
        // Running (its expert is asked to stop), or between the queues (routing, or a
        // worker about to start it): it is stopped where it is found next.
        auto run = attempt_stops_.find(id);
        if (run != attempt_stops_.end()) run->second->store(true);
        cancels_.insert(id);
      }
    }
    if (!ended.empty()) {
      ended[0].cancel = true;
      EndTask(ended[0], TaskState::kCancelled);
      return Status::OK();
    }
    Task t;
    CORTEX_RETURN_IF_ERROR(store_->GetTask(id, &t));
    if (IsFinal(t.state)) {
      std::lock_guard<std::mutex> l(queue_mu_);
      cancels_.erase(id);
      return Status::FailedPrecondition("task " + id + " has already ended: " + ToString(t.state));
    }
    return Status::OK();
  }

  Status WaitDone(const std::string& id, double timeout_s, Task* t, bool* done) override {
    // A task this cortexd still runs is waited for; any other has ended or is not ours.
    std::shared_ptr<Waiter> w;
    {
      std::lock_guard<std::mutex> l(waiters_mu_);
      if (live_.count(id)) {
        w = std::make_shared<Waiter>();
        waiters_[id].push_back(w);
      }
    }
    if (w) {
      auto deadline = std::chrono::steady_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
      {
        std::unique_lock<std::mutex> l(w->mu);
        while (!w->done && !stop_.load() && std::chrono::steady_clock::now() < deadline)
          w->cv.wait_for(l, std::chrono::milliseconds(200));
      }
      std::lock_guard<std::mutex> l(waiters_mu_);
      auto& v = waiters_[id];
      v.erase(std::remove(v.begin(), v.end(), w), v.end());
      if (v.empty()) waiters_.erase(id);
    }
    CORTEX_RETURN_IF_ERROR(store_->GetTask(id, t));
    *done = IsFinal(t->state);
    return Status::OK();
  }

  Store* store() override { return store_.get(); }
  ExpertRegistry* registry() override { return registry_.get(); }

  json Status_() override {
    std::vector<std::pair<std::string, long>> counts;
    (void)store_->CountByState(&counts);
    json by_state = json::object();
    for (const auto& [s, c] : counts) by_state[s] = c;
    size_t queued;
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      queued = queue_.size() + ready_.size();
    }
    auto router = CurrentRouter();
    int inflight = 0;
    auto active = registry_->Active();
    for (const auto& e : active) inflight += e->inflight();
    return {{"version", CortexVersion()},
            {"pid", getpid()},
            {"uptime_s", (env_->MonotonicMicros() - start_mono_) / 1e6},
            {"queue_depth", queued},
            {"inflight", inflight},
            {"backend", router->backend().rfind("cuda", 0) == 0 ? "cuda" : "cpu"},
            {"backend_device", router->backend()},
            {"backend_choice", backend_why_},
            {"model_version", router->model_version()},
            {"training", TrainingStatus()},
            {"store", store_->Path()},
            {"store_path", store_->Path()},
            {"plugin_dir", config_.plugins.dir},
            {"plugin_dirs", watch_dirs_},
            {"store_error", StoreError()},
            {"schema_version", store_->SchemaVersion()},
            {"socket", config_.daemon.socket},
            {"config", ConfigSource()},
            {"experts", active.size()},
            {"isolation", config_.plugins.isolation},
            {"rules", router->rules().size()},
            {"workers", config_.daemon.workers},
            {"exploration", router->options().exploration},
            {"tasks", by_state}};
  }

  Status Reload(json* summary) override {
    std::lock_guard<std::mutex> one_at_a_time(reload_mu_);
    // Without --config, the default places are looked at again: a file written there
    // since the start is read now.
    const std::string path =
        options_.config_path.empty() ? DefaultConfigFile() : options_.config_path;
    // A refusal names every error in the file, as --check-config would.
    auto refuse = [&](const Status& st) {
      Status all = EveryConfigError(st, path, options_)
                       .WithContext("reload refused, keeping the running config");
      LogLines(LogLevel::kError, all.message());  // whether asked by SIGHUP or cortexctl
      return all;
    };
    Result<Config> next = path.empty() ? Result<Config>(DefaultConfig()) : LoadConfigFile(path);
    if (!next.ok()) return refuse(next.status());
    Config& c = next.value();
    Result<RuleSet> rules = RuleSet::Compile(c.rules, c.source);
    if (!rules.ok()) return refuse(rules.status());
    registry_->Rescan();
    if (Status st = registry_->Configure(c); !st.ok()) return refuse(st);
    // Every changed setting is either applied now or named as needing a restart; none is
    // silently ignored. (Rules and experts are always applied.)
    Config run = running_;
    run.source = c.source;  // rules and experts are always applied, and said where from
    run.rules = c.rules;
    run.experts = c.experts;
    std::vector<std::string> applied, restart;
    const auto was = SettingsOf(running_), now = SettingsOf(c);
    for (const auto& [key, value] : now) {
      if (was.at(key) == value) continue;
      auto live = LiveSettings().find(key);
      if (live == LiveSettings().end()) {
        restart.push_back(key);
        LogWarn("reload: {} changed; it takes effect after a restart", key);
      } else {
        live->second(&run, c);
        applied.push_back(key);
      }
    }
    // What the live settings feed is rebuilt from `run`, the one copy of what runs.
    {
      std::lock_guard<std::mutex> l(router_mu_);
      router_ = std::make_shared<Router>(RouterOptionsFrom(run.router), std::move(rules).value(),
                                         MakeGatingScorer(learner_), learner_->hasher());
      max_attempts_live_ = run.router.max_attempts;
    }
    {
      std::lock_guard<std::mutex> l(train_mu_);
      schedule_ = RetrainSchedule(run.training.interval_s, run.training.min_new_outcomes);
      running_ = run;
    }
    shutdown_grace_s_ = run.daemon.shutdown_grace_s;
    max_queued_ = run.daemon.max_queued;
    WarnUnknownRuleExperts(run);
    queue_cv_.notify_all();
    work_cv_.notify_all();
    LogInfo("reloaded {}: {} experts, {} rules", c.source, registry_->Active().size(),
            c.rules.size());
    *summary = {{"config", c.source},
                {"experts", registry_->Active().size()},
                {"rules", c.rules.size()},
                {"applied", applied},
                {"needs_restart", restart}};
    return Status::OK();
  }

 private:
  // ---- start-up ------------------------------------------------------------------

  Status PrepareStore() {
    const std::string& path = config_.store.path;
    if (path != ":memory:") {
      std::string dir = fs::path(path).parent_path().string();
      // The folder is checked, not tightened: it may be one the user chose (a home).
      if (!dir.empty())
        CORTEX_RETURN_IF_ERROR(env_->MakePrivateDir(dir, false).WithContext("store.path"));
      // Store files are 0600 and never symlinks (SQLite gives its -wal and -shm files the
      // database file's mode).
      CORTEX_RETURN_IF_ERROR(env_->MakePrivateFile(path).WithContext("store.path"));
      for (const char* side : {"-wal", "-shm"}) {
        FileInfo fi;
        if (env_->Stat(path + side, &fi).ok() && fi.exists)
          CORTEX_RETURN_IF_ERROR(env_->MakePrivateFile(path + side).WithContext("store.path"));
      }
      // One daemon per store: a second one would interleave recovery with live work.
      std::string lock = path + ".lock";
      CORTEX_RETURN_IF_ERROR(env_->MakePrivateFile(lock).WithContext("store.path"));
      lock_fd_ = open(lock.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
      if (lock_fd_ < 0) return Status::IOError("cannot open " + lock + ": " + strerror(errno));
      // A predecessor that was just killed can hold the lock a moment longer (its exit is
      // not instant under load), so wait briefly before refusing; a live daemon keeps it.
      bool locked = false;
      for (int i = 0; i < 30 && !(locked = flock(lock_fd_, LOCK_EX | LOCK_NB) == 0); ++i)
        usleep(100000);
      if (!locked)
        return Status::FailedPrecondition("another cortexd is using the store " + path + " (lock " +
                                          lock + " is held)");
      // A predecessor that crashed (not one killed from outside) left which signal it was.
      crash_ = TakeCrashMarker(lock_fd_);
      SetCrashMarkerFd(lock_fd_);
    }
    Result<std::unique_ptr<Store>> s = OpenStore(path);
    if (!s.ok()) return s.status();
    store_ = std::move(s).value();
    return Status::OK();
  }

  static RouterOptions RouterOptionsFrom(const RouterConfig& r) {
    RouterOptions o;
    o.exploration = r.exploration;
    o.load_bias = r.load_bias;
    o.health_bias = r.health_bias;
    o.seed = r.seed ? r.seed : std::random_device{}();
    return o;
  }

  Status PrepareRouting() {
    Result<RuleSet> rules = RuleSet::Compile(config_.rules, config_.source);
    if (!rules.ok()) return rules.status();
    // The gating model's engines: one scores, one trains in the background.
    auto score_engine = MakeEngine(config_.router.backend, &backend_why_);
    if (!score_engine.ok()) return score_engine.status().WithContext(config_.source);
    std::string ignored;
    auto train_engine = MakeEngine(config_.router.backend, &ignored);
    if (!train_engine.ok()) return train_engine.status().WithContext(config_.source);
    LearnerOptions lo;
    lo.shape.seed = config_.router.seed ? config_.router.seed : 1;
    lo.online_updates = config_.training.online;
    lo.train.epochs = config_.training.epochs;
    lo.train.cancel = &stop_;  // a stop ends a retrain within one minibatch
    learner_ =
        std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), std::move(score_engine).value(),
                                  std::move(train_engine).value());
    CORTEX_RETURN_IF_ERROR(LoadLiveModel());
    newest_seq_ = learner_->trained_through();
    schedule_ = RetrainSchedule(config_.training.interval_s, config_.training.min_new_outcomes);
    router_ = std::make_shared<Router>(RouterOptionsFrom(config_.router), std::move(rules).value(),
                                       MakeGatingScorer(learner_), learner_->hasher());
    max_attempts_live_ = config_.router.max_attempts;

    ExpertRegistry::Options ro;
    CORTEX_RETURN_IF_ERROR(RegistryOptionsFor(config_, options_, &ro));
    (void)env_->CreateDirs(config_.plugins.dir, 0700);
    watch_dirs_ = ro.dirs;
    RemoveStalePluginCaches(fs::path(config_.daemon.socket).parent_path());
    ro.cache_dir = fs::path(config_.daemon.socket).parent_path().string() + "/plugin-cache." +
                   std::to_string(getpid());
    CORTEX_RETURN_IF_ERROR(env_->MakePrivateDir(ro.cache_dir, true).WithContext("plugin cache"));
    cache_dir_ = ro.cache_dir;
    ro.env = env_;
    if (ro.in_process) LogWarn("plugins run inside cortexd (plugins.isolation: in-process)");
    slot_waker_->cv = &work_cv_;
    slot_waker_->wanted = &slot_wanted_;
    ro.supervision.on_slot_free = [w = slot_waker_] {
      std::lock_guard<std::mutex> l(w->mu);
      if (w->cv && w->wanted->load()) w->cv->notify_all();
    };
    ro.audit = [this](const ExpertEvent& e) {
      Status st = store_->RecordExpertEvent(e);
      if (!st.ok()) LogWarn("audit: {}", st.ToString());
    };
    registry_ = std::make_unique<ExpertRegistry>(ro);
    registry_->Rescan();
    CORTEX_RETURN_IF_ERROR(registry_->Configure(config_));
    if (registry_->Active().empty())
      LogWarn("no experts are loaded: tasks stay queued until one is (drop a plugin into {})",
              config_.plugins.dir);
    WarnUnknownRuleExperts(config_);
    return Status::OK();
  }

  void WarnUnknownRuleExperts(const Config& c) {
    for (const auto& m :
         RuleExpertsMissing(c, [&](const std::string& n) { return !!registry_->Find(n); }))
      LogWarn("rule {} names expert '{}', which is not loaded; {}", m.rules, m.expert, m.effect);
  }

  Status Recover() {
    Store::Recovery rec;
    if (!crash_.empty()) {
      LogWarn(
          "the last cortexd {}: the tasks it was routing or running count that crash "
          "(poison-task guard)",
          crash_);
      RecordEvent("crashed", "the last cortexd " + crash_);
    }
    CORTEX_RETURN_IF_ERROR(store_->Recover(env_->NowUnix(), !crash_.empty(), &rec));
    if (rec.interrupted)
      LogWarn("{} task(s) were running when cortexd stopped: marked interrupted", rec.interrupted);
    for (const auto& id : rec.poisoned)
      LogError(
          "task {}: cortexd crashed {} times while routing or running it; marked failed "
          "instead of retrying it (cortexctl show {})",
          id, Store::kPoisonDeaths, id);
    if (!rec.requeue.empty())
      LogInfo("resuming {} queued task(s) from the store", rec.requeue.size());
    {
      std::lock_guard<std::mutex> w(waiters_mu_);
      for (const auto& t : rec.requeue) live_.insert(t.id);
    }
    std::lock_guard<std::mutex> l(queue_mu_);
    for (auto& t : rec.requeue) queue_.push_back(std::move(t));
    return Status::OK();
  }

  void SetupInotify() {
    if (!config_.plugins.watch) return;
    inotify_fd_ = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (inotify_fd_ < 0) {
      LogWarn("inotify unavailable ({}): plugin changes need `cortexctl reload`", strerror(errno));
      return;
    }
    for (const auto& d : watch_dirs_)
      if (inotify_add_watch(
              inotify_fd_, d.c_str(),
              IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_ATTRIB) < 0)
        LogWarn("cannot watch {}: {}", d, strerror(errno));
  }

  void HandleSignal() {
    struct signalfd_siginfo si;
    while (read(signal_fd_, &si, sizeof si) == sizeof si) {
      if (si.ssi_signo == SIGHUP) {
        LogInfo("SIGHUP: reloading");
        RequestLoad(true);
      } else {
        LogInfo("signal {}: stopping", si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
        RequestStop();
      }
    }
  }

  // Plugin rescans and SIGHUP reloads run on the loader thread: loading a file or starting
  // a host can take up to plugins.load_timeout, and the main thread must keep accepting.
  void RequestLoad(bool reload) {
    {
      std::lock_guard<std::mutex> l(load_mu_);
      (reload ? reload_wanted_ : rescan_wanted_) = true;
    }
    load_cv_.notify_all();
  }

  void LoadLoop() {
    while (true) {
      bool reload, rescan;
      {
        std::unique_lock<std::mutex> l(load_mu_);
        load_cv_.wait(l, [&] { return stop_.load() || reload_wanted_ || rescan_wanted_; });
        if (stop_.load()) return;
        reload = std::exchange(reload_wanted_, false);
        rescan = std::exchange(rescan_wanted_, false);
      }
      if (reload) {
        NotifyReloading();
        json summary;
        (void)Reload(&summary);            // rescans too; a refusal is logged there
        if (!stop_.load()) NotifyReady();  // serving again (a failed reload keeps the old)
      } else if (rescan) {
        registry_->Rescan();
      }
      queue_cv_.notify_all();  // a new expert may unblock queued tasks
      work_cv_.notify_all();
    }
  }

  void Shutdown() {
    NotifyStopping();
    server_->StopAccepting();
    { std::lock_guard<std::mutex> l(load_mu_); }  // the loader is waiting or sees stop_
    load_cv_.notify_all();
    if (loader_.joinable()) loader_.join();
    queue_cv_.notify_all();
    if (dispatcher_.joinable()) dispatcher_.join();
    train_cv_.notify_all();
    if (trainer_.joinable()) trainer_.join();
    // Workers finish the attempts they are running, up to the grace period; whatever
    // still runs after it is cancelled and marked interrupted.
    auto deadline =
        std::chrono::steady_clock::now() +
        std::chrono::milliseconds(static_cast<int64_t>(shutdown_grace_s_.load() * 1000));
    {
      std::unique_lock<std::mutex> l(queue_mu_);
      if (busy_workers_ > 0)
        LogInfo("stopping: waiting up to {:g}s (daemon.shutdown_grace) for {} running task(s)",
                shutdown_grace_s_.load(), busy_workers_);
      while (busy_workers_ > 0 && std::chrono::steady_clock::now() < deadline)
        queue_cv_.wait_for(l, std::chrono::milliseconds(50));
    }
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      abort_ = true;
      for (auto& [id, stop] : attempt_stops_) stop->store(true);
    }
    queue_cv_.notify_all();
    work_cv_.notify_all();
    for (auto& w : workers_) w.join();
    server_->CloseConnections();
    size_t left;
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      left = queue_.size() + ready_.size();
    }
    LogInfo("cortexd stopped; {} task(s) stay queued in the store for the next start", left);
  }

  // ---- routing and execution ------------------------------------------------------

  std::shared_ptr<Router> CurrentRouter() {
    std::lock_guard<std::mutex> l(router_mu_);
    return router_;
  }

  // Profiles of the active experts (manifest features cached per registry generation).
  std::vector<ExpertSlot> Slots(std::vector<std::shared_ptr<Expert>>* experts_out) {
    // The generation is read before the experts, so a rescan in between only causes
    // one more clear on the next call, never a stale profile under a new generation.
    const uint64_t generation = registry_->generation();
    auto experts = registry_->Active();
    auto router = CurrentRouter();
    std::lock_guard<std::mutex> l(profiles_mu_);
    if (profiles_generation_ != generation) {  // manifests may have changed: refill on demand
      profiles_.clear();
      profiles_generation_ = generation;
    }
    std::map<std::string, int> waiting;  // routed jobs waiting for each expert's slot
    {
      std::lock_guard<std::mutex> q(queue_mu_);
      for (const auto& j : ready_)
        if (j.next < j.decision.candidates.size()) ++waiting[j.decision.candidates[j.next].expert];
    }
    std::vector<ExpertSlot> slots;
    for (const auto& e : experts) {
      auto it = profiles_.find(e->name());
      if (it == profiles_.end()) {
        const Manifest& m = e->manifest();
        it =
            profiles_
                .emplace(e->name(),
                         router->hasher().Manifest({m.name, m.description, m.keywords, m.examples}))
                .first;
      }
      auto w = waiting.find(e->name());
      const double load =
          w == waiting.end()
              ? e->load()
              : std::min(1.0, (e->inflight() + w->second) /
                                  static_cast<double>(std::max(1, e->manifest().capacity)));
      slots.push_back({{e->name(), it->second}, load, e->health_penalty()});
    }
    if (experts_out) *experts_out = std::move(experts);
    return slots;
  }

  // Run by the submit at the front of the intake: routes and stores the batch queued so
  // far, then answers each of its submits and hands the lead to the next in line.
  void LeadIntake() {
    std::vector<Intake*> group;
    {
      std::lock_guard<std::mutex> l(intake_mu_);
      group.assign(intake_.begin(),
                   intake_.begin() + static_cast<long>(std::min(intake_.size(), kMaxIntake)));
    }
    AdmitBatch(group);
    Intake* next = nullptr;
    {
      std::lock_guard<std::mutex> l(intake_mu_);
      intake_.erase(intake_.begin(), intake_.begin() + static_cast<long>(group.size()));
      if (!intake_.empty()) next = intake_.front();
    }
    for (Intake* in : group) {  // under its own mutex: once told, it may be gone
      std::lock_guard<std::mutex> l(in->m);
      in->state = Intake::kDone;
      in->cv.notify_one();
    }
    if (next) {
      std::lock_guard<std::mutex> l(next->m);
      next->state = Intake::kLead;
      next->cv.notify_one();
    }
  }

  // New tasks are routed before they are stored, and stored with their decisions (and,
  // for those a worker can start at once, their first attempt) in one commit: one fsync
  // between a submit and the run. Nothing is acknowledged before that commit, so a crash
  // while routing them leaves nothing behind to crash again. A task that cannot be
  // routed now (no experts loaded, a routing error) is stored as queued for the
  // dispatcher. Each submit's status is set in its Intake; the bound's places they held
  // are given back as they enter the queues.
  void AdmitBatch(const std::vector<Intake*>& group) {
    CrashStackOnce();  // routing runs here: a poison task's overflow must reach the handler
    const uint64_t generation = registry_->generation();  // before the experts are read
    std::vector<std::shared_ptr<Expert>> experts;
    std::vector<ExpertSlot> slots = Slots(&experts);
    std::vector<Decision> decisions;
    bool routed = false;
    if (!slots.empty()) {
      std::vector<RouteRequest> reqs;
      for (const Intake* in : group) reqs.push_back({in->task.text, in->task.tags});
      Status st = CurrentRouter()->Route(reqs, slots, true, env_->NowUnix(), &decisions);
      if (st.ok())
        routed = true;
      else
        LogError("cannot route {} new task(s) ({}); they wait in the queue", group.size(),
                 st.ToString());
    }
    // Started now: a task whose chosen expert has a free slot, while a worker is idle to
    // run it. (A forced decision's chosen expert is its only one; a busy or absent one
    // leaves the task routed, for the workers to start once it has room.)
    // A task whose submitter waits longer than its expert's timeout runs on the
    // submitter's thread (its answer cannot be late for it); others need an idle worker.
    std::vector<std::shared_ptr<Expert>> held(group.size());
    std::vector<bool> here(group.size(), false);
    if (routed) {
      int idle;
      {
        std::lock_guard<std::mutex> q(queue_mu_);
        idle = config_.daemon.workers - busy_workers_ - static_cast<int>(started_.size());
      }
      for (size_t i = 0; i < group.size(); ++i) {
        const std::string& chosen = decisions[i].chosen;
        for (const auto& e : experts) {
          if (e->name() != chosen) continue;
          here[i] = group[i]->wait_s >= e->manifest().timeout_s + kRunHereMargin;
          if ((here[i] || idle > 0) && !e->quarantined() && e->TryAcquireSlot()) {
            held[i] = e;
            if (!here[i]) --idle;
          }
          break;
        }
      }
    }
    std::vector<Store::Admission> batch;
    for (size_t i = 0; i < group.size(); ++i)
      batch.push_back({&group[i]->task, routed ? &decisions[i] : nullptr,
                       held[i] ? held[i]->name() : std::string()});
    std::vector<Status> stored;
    store_->Admit(batch, &stored);
    {
      std::lock_guard<std::mutex> w(waiters_mu_);
      for (size_t i = 0; i < group.size(); ++i)
        if (stored[i].ok()) live_.insert(group[i]->task.id);
    }
    std::vector<Job> jobs;
    std::vector<Task> queued;
    for (size_t i = 0; i < group.size(); ++i) {
      Intake& in = *group[i];
      in.result = stored[i];
      if (!stored[i].ok()) {
        if (held[i]) held[i]->ReleaseSlot();
        continue;
      }
      if (!routed) {
        queued.push_back(in.task);
        continue;
      }
      WarnIfForcedExpertAbsent(in.task.id, decisions[i], slots);
      Job job;
      job.task = in.task;
      job.decision = std::move(decisions[i]);
      job.generation = generation;
      job.held = std::move(held[i]);
      if (job.held && here[i])
        in.run_here = std::move(job);
      else
        jobs.push_back(std::move(job));
    }
    if (!jobs.empty() || !queued.empty()) NoteStoreSuccess();
    {
      std::lock_guard<std::mutex> q(queue_mu_);
      for (Intake* in : group) {
        if (!in->result.ok()) continue;  // a failed one is tried again or given back
        --admitting_;
        if (in->run_here) ++busy_workers_;
      }
      for (auto& j : jobs) (j.held ? started_ : ready_).push_back(std::move(j));
      for (auto& t : queued) queue_.push_back(std::move(t));
    }
    if (!queued.empty()) queue_cv_.notify_all();
    for (size_t i = 0; i < jobs.size() && i < static_cast<size_t>(config_.daemon.workers); ++i)
      work_cv_.notify_one();
  }

  // A force rule sends the task to an expert that cannot take it now: it waits (logged).
  void WarnIfForcedExpertAbsent(const std::string& id, const Decision& d,
                                const std::vector<ExpertSlot>& slots) {
    if (!d.forced || std::any_of(slots.begin(), slots.end(),
                                 [&](const ExpertSlot& s) { return s.profile.name == d.chosen; }))
      return;
    const std::shared_ptr<Expert> there = registry_->Find(d.chosen);
    LogWarn(
        "task {}: a force rule ({}) sends it to expert '{}', which {}, or `cortexctl "
        "cancel {}`",
        id, fmt::join(d.candidates.front().rules, ", "), d.chosen,
        there && there->quarantined()
            ? fmt::format("is quarantined: it waits until `cortexctl experts release {}`", d.chosen)
            : fmt::format("is not loaded: it waits until '{}' is loaded", d.chosen),
        id);
  }

  void DispatchLoop() {
    UseCrashStackOnThisThread();  // routing is where a poison task would overflow a stack
    // Routed jobs wait in ready_ for a slot without holding a worker, so routing never
    // waits for capacity; a small batch keeps each decision's load picture fresh (the
    // load an expert shows counts the jobs already waiting for it).
    const size_t max_batch = static_cast<size_t>(config_.daemon.workers) * 2;
    while (true) {
      std::vector<Task> batch;
      {
        std::unique_lock<std::mutex> l(queue_mu_);
        queue_cv_.wait_for(l, std::chrono::milliseconds(500),
                           [&] { return stop_.load() || !queue_.empty(); });
        if (stop_.load()) return;
        if (queue_.empty()) continue;
        // A task that was in flight when cortexd died is a suspect: it is routed alone,
        // so a second death is counted against it and not against its batch mates.
        size_t n = std::min(queue_.size(), max_batch);
        if (queue_.front().deaths > 0) n = 1;
        for (size_t i = 0; i < n && (i == 0 || queue_.front().deaths == 0); ++i) {
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
        routing_ += batch.size();
      }
      // Cancelled while the dispatcher held them (say, waiting for an expert): they end.
      for (auto it = batch.begin(); it != batch.end();) {
        if (!CancelRequested(it->id)) {
          ++it;
          continue;
        }
        Job j;
        j.task = std::move(*it);
        j.cancel = true;
        EndTask(j, TaskState::kCancelled);
        it = batch.erase(it);
        std::lock_guard<std::mutex> l(queue_mu_);
        --routing_;
      }
      if (batch.empty()) continue;
      const uint64_t generation = registry_->generation();  // before the experts are read
      std::vector<ExpertSlot> slots = Slots(nullptr);
      if (slots.empty()) {
        // Nothing to route to: put the batch back (unmarked: the router never saw it) and
        // wait for an expert to appear.
        Requeue(&batch, std::chrono::seconds(1));
        continue;
      }
      std::vector<std::string> ids;
      for (const auto& t : batch) ids.push_back(t.id);
      if (Status ms = store_->MarkRouting(ids); !ms.ok()) {
        // Without the mark a crash here could repeat on every start: wait for the store.
        LogError("cannot mark {} task(s) as routing ({}); retrying", ids.size(), ms.ToString());
        Requeue(&batch, std::chrono::seconds(1));
        continue;
      }
      std::vector<RouteRequest> reqs;
      for (const auto& t : batch) reqs.push_back({t.text, t.tags});
      std::vector<Decision> decisions;
      if (Status st = CurrentRouter()->Route(reqs, slots, true, env_->NowUnix(), &decisions);
          !st.ok()) {
        LogError("cannot route {} task(s) ({}); retrying", ids.size(), st.ToString());
        Requeue(&batch, std::chrono::seconds(1));
        continue;
      }
      std::vector<Job> jobs;
      std::vector<Task> unrecorded;  // routed again once the store takes writes
      // The batch's decisions in one commit (one fsync), each with its own status.
      std::vector<std::pair<std::string, const Decision*>> to_record;
      for (size_t i = 0; i < batch.size(); ++i) to_record.emplace_back(batch[i].id, &decisions[i]);
      std::vector<Status> recorded;
      store_->RecordDecisions(to_record, &recorded);
      for (size_t i = 0; i < batch.size(); ++i) {
        const Status& rs = recorded[i];
        if (!rs.ok()) {
          NoteStoreFailure(rs);
          LogError("task {}: cannot record its decision ({}); routing it again shortly",
                   batch[i].id, rs.ToString());
          unrecorded.push_back(std::move(batch[i]));
          continue;
        }
        WarnIfForcedExpertAbsent(batch[i].id, decisions[i], slots);
        Job job;
        job.task = std::move(batch[i]);
        job.decision = std::move(decisions[i]);
        job.generation = generation;
        jobs.push_back(std::move(job));
      }
      if (!jobs.empty()) NoteStoreSuccess();
      {
        std::lock_guard<std::mutex> l(queue_mu_);
        routing_ -= jobs.size();
        for (auto& j : jobs) ready_.push_back(std::move(j));
      }
      work_cv_.notify_all();
      if (!unrecorded.empty()) Requeue(&unrecorded, std::chrono::seconds(1));
    }
  }

  // Puts `batch` back at the head of the queue, in order, and waits `pause` (or for stop)
  // before the dispatcher tries again.
  // Puts tasks the dispatcher took back at the front of queue_, then pauses.
  void Requeue(std::vector<Task>* batch, std::chrono::milliseconds pause) {
    std::unique_lock<std::mutex> l(queue_mu_);
    routing_ -= batch->size();
    for (auto it = batch->rbegin(); it != batch->rend(); ++it) queue_.push_front(std::move(*it));
    batch->clear();
    queue_cv_.wait_for(l, pause, [&] { return stop_.load(); });
  }

  // Workers take only work that can start now: a job whose next expert has a free slot
  // (taken here, before anything is recorded). A job for a busy expert stays in ready_
  // and holds no worker; a freed slot wakes the workers (Supervision::on_slot_free).
  void WorkerLoop() {
    UseCrashStackOnThisThread();  // an in-process plugin runs on this stack
    // This worker's view of the active experts, read again only when the set changes
    // (generation first: a view is never older than the generation it is kept for).
    std::map<std::string, std::shared_ptr<Expert>> experts;
    uint64_t seen = ~uint64_t{0};
    while (true) {
      Job job;
      std::shared_ptr<Expert> expert;
      bool recorded = false;  // its attempt was recorded at admission
      while (true) {
        // The registry is read before queue_mu_ is taken: a rescan holding the registry
        // must not hold up submissions through queue_mu_.
        if (const uint64_t g = registry_->generation(); g != seen) {
          experts.clear();
          for (auto& e : registry_->Active()) experts.emplace(e->name(), std::move(e));
          seen = g;
        }
        std::unique_lock<std::mutex> l(queue_mu_);
        // A started job is already recorded as running: it runs even during a stop
        // (within the grace period, as every running attempt).
        if (abort_.load() || (stop_.load() && started_.empty())) return;
        if (!started_.empty()) {
          job = std::move(started_.front());
          started_.pop_front();
          expert = std::move(job.held);
          recorded = true;
          ++busy_workers_;
          break;
        }
        if (stop_.load()) return;
        const bool picked = PickLocked(experts, seen, &job, &expert);
        if (std::exchange(requeued_, false)) queue_cv_.notify_all();  // for the dispatcher
        if (picked) {
          ++busy_workers_;
          break;
        }
        slot_wanted_ = !ready_.empty();
        work_cv_.wait_for(l, std::chrono::milliseconds(200));
      }
      if (job.cancel)
        EndTask(job, TaskState::kCancelled);
      else if (expert)
        RunAttempt(std::move(job), expert, recorded);
      else
        EndTask(job, TaskState::kFailed);  // no candidate left to try
      {
        std::lock_guard<std::mutex> l(queue_mu_);
        --busy_workers_;
      }
      if (stop_.load()) queue_cv_.notify_all();  // the stop waits for running tasks
    }
  }

  // The first job in ready_ that can run now (its slot taken: `expert` is set) or that has
  // no attempt left (`expert` stays null: it ends failed). A job whose candidates all
  // vanished before any attempt goes back to be routed again. Holds queue_mu_.
  bool PickLocked(const std::map<std::string, std::shared_ptr<Expert>>& experts,
                  uint64_t generation, Job* out, std::shared_ptr<Expert>* expert) {
    const int max_attempts = max_attempts_live_.load();
    std::set<std::string> full;  // experts found busy in this scan: not asked again
    for (auto it = ready_.begin(); it != ready_.end();) {
      Job& j = *it;
      if (cancels_.count(j.task.id)) {
        j.cancel = true;
        *out = std::move(j);
        ready_.erase(it);
        return true;
      }
      const auto& cands = j.decision.candidates;
      // Removed or quarantined since the decision: not an attempt, try the next one. A
      // forced decision is policy: that expert only, one attempt, no fallback.
      auto usable = [&](const Candidate& c) {
        if (j.decision.forced && c.expert != j.decision.chosen) return false;
        auto e = experts.find(c.expert);
        return e != experts.end() && !e->second->quarantined();
      };
      while (j.next < cands.size() && !usable(cands[j.next])) ++j.next;
      if (j.next >= cands.size() || j.attempts >= (j.decision.forced ? 1 : max_attempts)) {
        if (j.attempts == 0) {
          // No candidate can run it yet. If the experts changed since it was routed, it is
          // routed again; if not (all quarantined), it waits here for a release instead of
          // being routed again and again.
          j.next = 0;
          if (generation == j.generation) {
            ++it;
            continue;
          }
          queue_.push_back(std::move(j.task));
          it = ready_.erase(it);
          requeued_ = true;
          continue;
        }
        *out = std::move(j);
        ready_.erase(it);
        return true;
      }
      const std::string& name = cands[j.next].expert;
      if (!full.count(name)) {
        const std::shared_ptr<Expert>& e = experts.at(name);
        if (e->TryAcquireSlot()) {
          *expert = e;
          *out = std::move(j);
          ready_.erase(it);
          return true;
        }
        full.insert(name);
      }
      ++it;
    }
    return false;
  }

  // One attempt, on a slot already taken; then the task ends or waits for its next
  // candidate in ready_.
  void RunAttempt(Job job, const std::shared_ptr<Expert>& expert, bool recorded) {
    const std::string& id = job.task.id;
    const int n = job.attempts + 1;
    // An attempt is recorded when it really starts (its slot is held), so recovery
    // re-runs what never started; a first attempt started at admission is recorded
    // already. A store that refuses writes (a full disk) holds the task here, in memory,
    // until it takes them or cortexd stops (the task is then resumed from the store at
    // the next start).
    if (!recorded && !Persist(fmt::format("task {}: recording attempt {}", id, n), [&] {
          return store_->StartAttempt(id, n, expert->name(), env_->NowUnix());
        })) {
      expert->ReleaseSlot();
      return;
    }
    // The attempt stops early when cortexd's grace period ends or the task is cancelled.
    auto stop = std::make_shared<std::atomic<bool>>(false);
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      if (abort_.load() || cancels_.count(id)) stop->store(true);
      attempt_stops_[id] = stop;
    }
    Outcome o = expert->RunWithSlot(job.task, stop.get());
    bool cancelled;
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      attempt_stops_.erase(id);
      cancelled = cancels_.count(id) > 0;
    }
    if (stop->load() && o.kind != OutcomeKind::kSuccess) {
      o.kind = OutcomeKind::kInterrupted;
      o.error = cancelled ? "cancelled (cortexctl cancel)"
                          : "cortexd stopped before the attempt finished";
    }
    const double finished = env_->NowUnix();
    // An outcome that ends the task is written with the task's end, in one commit.
    std::optional<TaskState> ends;
    if (o.kind == OutcomeKind::kSuccess)
      ends = TaskState::kSucceeded;
    else if (cancelled)
      ends = TaskState::kCancelled;
    else if (o.kind == OutcomeKind::kInterrupted)
      ends = TaskState::kInterrupted;
    if (!Persist(fmt::format("task {}: recording the outcome of attempt {}", id, n),
                 [&] { return store_->FinishAttempt(id, n, o, finished, ends); }))
      return;
    train_cv_.notify_all();  // the learner reads the new outcome from the store
    job.attempts = n;
    job.last_expert = expert->name();
    ++job.next;
    if (ends) return Ended(id, *ends);
    LogDebug("task {}: {} on {} ({}), falling back", id, ToString(o.kind), expert->name(), o.error);
    // On to the next candidate when it has room (or to its end, if there is none).
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      ready_.push_front(std::move(job));
    }
    work_cv_.notify_one();
  }

  void EndTask(const Job& job, TaskState state) {
    const std::string& id = job.task.id;
    const double ended = env_->NowUnix();
    if (!Persist(fmt::format("task {}: recording its end", id),
                 [&] { return store_->FinishTask(id, state, job.last_expert, ended); }))
      return;
    Ended(id, state);
  }

  // After a task's end is stored: its waiters are woken.
  void Ended(const std::string& id, TaskState state) {
    if (state == TaskState::kCancelled) LogInfo("task {} cancelled", id);
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      cancels_.erase(id);
    }
    NotifyDone(id);
  }

  bool CancelRequested(const std::string& id) {
    std::lock_guard<std::mutex> l(queue_mu_);
    return cancels_.count(id) > 0;
  }

  // Retries a store write every second until it succeeds (true) or the grace period is
  // over (false): a full disk must not drop a task from memory. `status` shows the error
  // meanwhile.
  bool Persist(const std::string& what, const std::function<Status()>& write) {
    for (int tries = 0;; ++tries) {
      Status st = write();
      if (st.ok()) {
        if (tries) LogInfo("{}: the store takes writes again", what);
        NoteStoreSuccess();
        return true;
      }
      NoteStoreFailure(st);
      if (tries == 0) LogError("{}: {}; retrying every second", what, st.ToString());
      std::unique_lock<std::mutex> l(queue_mu_);
      if (queue_cv_.wait_for(l, std::chrono::seconds(1), [&] { return abort_.load(); }))
        return false;
    }
  }

  void NoteStoreFailure(const Status& st) {
    std::lock_guard<std::mutex> l(store_error_mu_);
    store_error_ = st.message();
  }
  void NoteStoreSuccess() {
    std::lock_guard<std::mutex> l(store_error_mu_);
    store_error_.clear();
  }
  // Why writes fail now (the file gone or replaced, or the last write's error), or null.
  json StoreError() {
    if (Status h = store_->Health(); !h.ok()) return h.message();
    std::lock_guard<std::mutex> l(store_error_mu_);
    return store_error_.empty() ? json(nullptr) : json(store_error_);
  }

  void NotifyDone(const std::string& id) {
    std::vector<std::shared_ptr<Waiter>> ws;
    {
      std::lock_guard<std::mutex> l(waiters_mu_);
      live_.erase(id);
      auto it = waiters_.find(id);
      if (it != waiters_.end()) ws = it->second;
    }
    for (auto& w : ws) {
      {
        std::lock_guard<std::mutex> l(w->mu);
        w->done = true;
      }
      w->cv.notify_all();
    }
  }

  // ---- learning -------------------------------------------------------------------

  std::vector<LoggedOutcome> OutcomesAfter(long seq) {
    std::vector<LoggedOutcome> out;
    Status st = store_->ForEachOutcome(seq, [&](const LoggedOutcome& o) {
      out.push_back(o);
      return true;
    });
    if (!st.ok()) LogError("reading outcomes: {}", st.ToString());
    return out;
  }

  // The live version from the store, brought up to date with the outcomes logged since it
  // was trained (the same online steps it took while it was running).
  Status LoadLiveModel() {
    std::vector<ModelRecord> models;
    CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
    for (const auto& m : models) {
      if (!m.live) continue;
      ModelRecord full;
      CORTEX_RETURN_IF_ERROR(store_->LoadModel(m.version, &full));
      auto model = GatingModel::Deserialize(full.weights);
      if (!model.ok())
        return model.status().WithContext("live model v" + std::to_string(m.version));
      learner_->Install(std::move(model).value(), m.version, m.trained_through,
                        OutcomesAfter(m.trained_through));
      LogInfo("model v{} is live (trained through outcome {})", m.version, m.trained_through);
      return Status::OK();
    }
    learner_->Install(GatingModel(learner_->options().shape), 0, 0, OutcomesAfter(0));
    return Status::OK();
  }

  // The file the running config came from (a reload may have found one since the start).
  std::string ConfigSource() {
    std::lock_guard<std::mutex> l(train_mu_);
    return running_.source;
  }

  json TrainingStatus() {
    std::lock_guard<std::mutex> l(train_mu_);
    return {{"new_outcomes", new_outcomes_},
            {"interval_s", running_.training.interval_s},
            {"min_new_outcomes", running_.training.min_new_outcomes},
            {"in_progress", retraining_ ? json(retrain_log_.back()) : json(nullptr)},
            {"last_retrain", last_retrain_}};
  }

  void TrainLoop() {
    while (!stop_.load()) {
      bool requested;
      {
        std::unique_lock<std::mutex> l(train_mu_);
        train_cv_.wait_for(l, std::chrono::seconds(1));
        if (stop_.load()) return;
        requested = retrain_requests_ > requests_served_;
      }
      // Online: every outcome the live model has not learned from yet, in log order.
      // (After a rollback this also replays outcomes already counted once: only those
      // past the newest one seen count as new.)
      std::vector<LoggedOutcome> fresh = OutcomesAfter(learner_->trained_through());
      long added = 0;
      for (const auto& o : fresh) {
        learner_->Observe(o);
        if (o.seq > newest_seq_) ++added, newest_seq_ = o.seq;
      }
      bool due;
      {
        std::lock_guard<std::mutex> l(train_mu_);
        new_outcomes_ += added;
        due = requested || schedule_.Due(new_outcomes_, env_->NowUnix());
      }
      if (due) RunRetrain();
    }
  }

  void RunRetrain() {
    const double now = env_->NowUnix();
    long target;
    {
      std::lock_guard<std::mutex> l(train_mu_);
      schedule_.Done(now);
      new_outcomes_ = 0;
      target = retrain_requests_;
      retraining_ = true;
      retrain_log_ = {"reading logged outcomes"};
      ++retrain_seq_;
    }
    train_cv_.notify_all();
    json summary;
    Status st = RetrainOnce(now, &summary);
    // A retrain reads and featurizes its whole window (tens of MB, freed by now); hand
    // that back to the kernel, or glibc keeps it and cortexd's RSS ratchets upwards.
    malloc_trim(0);
    if (!st.ok()) {
      LogWarn("retrain: {}", st.message());
      summary = {{"error", st.message()}, {"promoted", false}};
    }
    {
      std::lock_guard<std::mutex> l(train_mu_);
      last_retrain_ = summary;
      retraining_ = false;
      requests_served_ = std::max(requests_served_, target);
    }
    train_cv_.notify_all();
  }

  Status RetrainOnce(double now, json* summary) {
    // Only the window a retrain uses (training examples plus the holdout), so memory and
    // time stay bounded however long the log grows.
    const LearnerOptions& lo = learner_->options();
    long after = 0;
    CORTEX_RETURN_IF_ERROR(
        store_->OutcomeWindowStart(static_cast<long>(lo.max_examples) + lo.max_holdout, &after));
    std::vector<LoggedOutcome> history = OutcomesAfter(after);
    std::vector<ModelRecord> models;
    CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
    const int version = models.empty() ? 1 : models.back().version + 1;
    auto res = learner_->Retrain(history, version, now, [this](const std::string& msg) {
      {
        std::lock_guard<std::mutex> l(train_mu_);
        retrain_log_.push_back(msg);
      }
      train_cv_.notify_all();
    });
    if (!res.ok()) return res.status();
    // A stop asked for while training ends the retrain here: nothing is saved or promoted.
    if (stop_.load()) return Status::Unavailable("training was cancelled: cortexd is stopping");
    ModelRecord rec = res->record;
    rec.weights = res->model.Serialize();
    rec.live = res->promoted;
    CORTEX_RETURN_IF_ERROR(store_->SaveModel(rec));
    if (res->promoted)
      learner_->Install(std::move(res->model), version, rec.trained_through,
                        OutcomesAfter(rec.trained_through));
    LogInfo(
        "retrain v{}: {} ({} train, {} held out; candidate {:.3f}, live {:.3f}, diff {:+.3f} "
        "± {:.3f})",
        version, res->promoted ? "promoted" : "refused", res->train_rows, res->holdout_rows,
        res->candidate.value, res->live.value, res->diff.value, res->diff.ci);
    RecordEvent("retrain", fmt::format("model v{} {}: {}", version,
                                       res->promoted ? "promoted" : "refused", res->reason));
    *summary = ModelJson(rec);
    (*summary)["live"] = res->promoted;
    return Status::OK();
  }

  // An entry in the audit's event log (`cortexctl events`) that is about no one expert.
  void RecordEvent(const std::string& event, const std::string& detail) {
    Status st = store_->RecordExpertEvent({env_->NowUnix(), "", "", event, detail});
    if (!st.ok()) LogWarn("audit: {}", st.ToString());
  }

  static json ModelJson(const ModelRecord& m) {
    json metrics = json::parse(m.metrics, nullptr, false);
    return {
        {"version", m.version},
        {"name", Learner::VersionName(m.version)},
        {"created", wire::IsoTime(m.created)},
        {"status", m.status},
        {"live", m.live},
        {"trained_through", m.trained_through},
        {"weights_bytes", m.weights_bytes ? m.weights_bytes : static_cast<long>(m.weights.size())},
        {"metrics", metrics.is_discarded() ? json::object() : metrics}};
  }

  Status Retrain(bool wait, const std::function<bool(const std::string&)>& progress,
                 json* result) override {
    long ticket;
    {
      std::lock_guard<std::mutex> l(train_mu_);
      ticket = ++retrain_requests_;
    }
    train_cv_.notify_all();
    if (!wait) {
      *result = {{"queued", true}};
      return Status::OK();
    }
    // Every progress line of the retrains that run while we wait, none skipped however
    // fast they come.
    long seq = -1;
    size_t sent = 0;
    std::unique_lock<std::mutex> l(train_mu_);
    if (!retraining_) seq = retrain_seq_, sent = retrain_log_.size();  // old news
    auto forward = [&]() -> bool {
      if (retrain_seq_ != seq) seq = retrain_seq_, sent = 0;
      while (sent < retrain_log_.size()) {
        std::string line = retrain_log_[sent++];
        l.unlock();
        bool alive = progress(line);
        l.lock();
        if (!alive) return false;
        if (retrain_seq_ != seq) seq = retrain_seq_, sent = 0;
      }
      return true;
    };
    while (requests_served_ < ticket) {
      if (stop_.load())
        return Status::Unavailable("cortexd is stopping; the retrain did not finish");
      if (!forward()) return Status::Unavailable("client went away");
      train_cv_.wait_for(l, std::chrono::milliseconds(200));
    }
    if (!forward()) return Status::Unavailable("client went away");
    *result = last_retrain_;
    if (result->contains("error"))
      return Status::FailedPrecondition("retrain failed: " + (*result)["error"].get<std::string>());
    return Status::OK();
  }

  Status Models(json* result) override {
    std::vector<ModelRecord> models;
    CORTEX_RETURN_IF_ERROR(store_->ListModels(&models));
    json a = json::array();
    bool any_live = false;
    for (const auto& m : models) any_live |= m.live;
    // v0 is the untrained model: the calibrated manifest prior, before any retrain.
    a.push_back({{"version", 0},
                 {"name", "v0"},
                 {"status", "initial"},
                 {"live", !any_live},
                 {"metrics", {{"note", "untrained: manifest prior plus online updates"}}}});
    for (const auto& m : models) a.push_back(ModelJson(m));
    *result = {{"models", a}, {"live_version", learner_->live_version()}};
    return Status::OK();
  }

  Status Rollback(int version, bool force, json* result) override {
    if (version == learner_->live_version()) {  // nothing to do, and no event to record
      *result = {{"live_version", version}, {"previous", version}, {"unchanged", true}};
      return Status::OK();
    }
    GatingModel model(learner_->options().shape);
    long through = 0;
    if (version != 0) {
      ModelRecord rec;
      CORTEX_RETURN_IF_ERROR(store_->LoadModel(version, &rec));
      if (rec.status == "refused" && !force) {
        std::string why;
        try {
          why = json::parse(rec.metrics).value("reason", "");
        } catch (const json::exception&) {
        }
        return Status::FailedPrecondition(
            "model v" + std::to_string(version) + " was refused at validation" +
            (why.empty() ? "" : " (" + why + ")") + "; `cortexctl models rollback " +
            std::to_string(version) + " --force` makes it live anyway");
      }
      auto m = GatingModel::Deserialize(rec.weights);
      if (!m.ok()) return m.status().WithContext("model v" + std::to_string(version));
      model = std::move(m).value();
      through = rec.trained_through;
    }
    const int previous = learner_->live_version();
    CORTEX_RETURN_IF_ERROR(store_->SetLiveModel(version));
    // Outcomes after its cutoff are applied by the trainer thread, the only thread that
    // feeds the learner, so none is skipped or applied twice by a concurrent catch-up.
    learner_->Install(std::move(model), version, through, {});
    train_cv_.notify_all();
    LogInfo("rollback: model v{} is live again (was v{})", version, previous);
    RecordEvent("rollback", fmt::format("model v{} is live again (was v{}){}", version, previous,
                                        force ? ", forced" : ""));
    *result = {{"live_version", version}, {"previous", previous}};
    return Status::OK();
  }

  std::string NewId() {
    std::lock_guard<std::mutex> l(id_mu_);
    static const char* hex = "0123456789abcdef";
    std::string s(12, '0');
    uint64_t r = id_rng_();
    for (char& c : s) c = hex[(r >>= 4) & 0xF];
    return s;
  }

  Config config_;
  DaemonOptions options_;
  Env* env_;
  int64_t start_mono_ = 0;
  int lock_fd_ = -1, inotify_fd_ = -1, signal_fd_ = -1;
  std::string crash_;  // what the last cortexd on this store crashed of ("" if it did not)
  std::vector<std::string> watch_dirs_;

  std::unique_ptr<Store> store_;
  std::unique_ptr<ExpertRegistry> registry_;
  std::string cache_dir_;  // private copies of the plugin files, removed at exit
  std::unique_ptr<Server> server_;
  std::mutex router_mu_;
  std::shared_ptr<Router> router_;
  std::atomic<int> max_attempts_live_{2};
  std::atomic<size_t> max_queued_{100000};
  // Tasks out of queue_ and ready_ yet not running, for the max_queued bound (queue_mu_):
  // the dispatcher's batch, and submits storing theirs.
  size_t routing_ = 0, admitting_ = 0;

  std::shared_ptr<Learner> learner_;
  std::string backend_why_;
  std::thread trainer_;
  long newest_seq_ = 0;  // newest outcome the trainer has seen (trainer thread only)
  std::mutex train_mu_;  // guards the fields below
  std::condition_variable train_cv_;
  RetrainSchedule schedule_{600, 200};
  long new_outcomes_ = 0;      // since the last retrain
  long retrain_requests_ = 0;  // asked for by `cortexctl retrain`
  long requests_served_ = 0;   // requests made before a retrain that has since finished
  bool retraining_ = false;
  std::vector<std::string> retrain_log_;  // the current (or last) retrain's progress lines
  long retrain_seq_ = 0;                  // bumped when a retrain starts
  json last_retrain_;

  std::mutex profiles_mu_;
  std::map<std::string, SparseVector> profiles_;
  uint64_t profiles_generation_ = ~0ULL;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;  // the dispatcher, stops and retries wait here
  std::condition_variable work_cv_;   // idle workers wait here
  // Set (under queue_mu_) while routed jobs wait for a busy expert: only then does a freed
  // slot wake the workers.
  std::atomic<bool> slot_wanted_{false};
  bool requeued_ = false;    // PickLocked sent a job back to be routed (queue_mu_)
  std::deque<Task> queue_;   // stored, not yet routed
  std::deque<Job> ready_;    // routed, waiting for a worker
  std::deque<Job> started_;  // first attempt recorded on a slot it holds: next to run
  static constexpr size_t kMaxIntake = 256;    // tasks routed and stored together at most
  static constexpr double kRunHereMargin = 1;  // s: a waiter's time to hear of the end
  std::mutex intake_mu_;
  std::deque<Intake*> intake_;  // submits waiting for their batch, oldest first
  int busy_workers_ = 0;
  std::thread dispatcher_;
  std::vector<std::thread> workers_;
  // Hosts and plugin threads free slots from their own threads, possibly after this
  // object is gone: they reach queue_cv_ only through this, which the destructor clears.
  struct SlotWaker {
    std::mutex mu;
    std::condition_variable* cv = nullptr;
    const std::atomic<bool>* wanted = nullptr;
  };
  std::shared_ptr<SlotWaker> slot_waker_ = std::make_shared<SlotWaker>();
  std::mutex reload_mu_;  // one reload at a time (SIGHUP and `cortexctl reload`)
  std::thread loader_;
  std::mutex load_mu_;
  std::condition_variable load_cv_;
  bool reload_wanted_ = false, rescan_wanted_ = false;
  Config running_;  // the settings in force: the start's, plus live reloads (train_mu_)
  std::atomic<double> shutdown_grace_s_{10};
  std::mutex store_error_mu_;
  std::string store_error_;         // the last failed write's error, until one succeeds
  std::atomic<bool> stop_{false};   // no new work
  std::atomic<bool> abort_{false};  // grace period over: cancel running attempts
  // Guarded by queue_mu_: each running attempt's stop flag, and the tasks `cancel` asked
  // to end that were not in a queue at that moment.
  std::map<std::string, std::shared_ptr<std::atomic<bool>>> attempt_stops_;
  std::set<std::string> cancels_;

  std::mutex waiters_mu_;
  std::map<std::string, std::vector<std::shared_ptr<Waiter>>> waiters_;
  std::unordered_set<std::string> live_;  // tasks in the pipeline, not yet ended

  std::mutex id_mu_;
  std::mt19937_64 id_rng_{std::random_device{}()};
};

}  // namespace

Result<std::unique_ptr<Daemon>> Daemon::Create(Config config, DaemonOptions options) {
  return std::unique_ptr<Daemon>(new DaemonImpl(std::move(config), std::move(options)));
}

namespace {
// A registry as a start would build it (every plugin loaded in a host), with its private
// copies in a temporary folder that is removed afterwards: for checks that must not touch
// a running daemon's files.
Status WithScratchRegistry(const Config& config, const DaemonOptions& options,
                           std::function<void(const ExpertEvent&)> audit,
                           const std::function<void(ExpertRegistry&)>& fn) {
  ExpertRegistry::Options ro;
  CORTEX_RETURN_IF_ERROR(RegistryOptionsFor(config, options, &ro));
  std::string tmpl =
      (getenv("TMPDIR") ? std::string(getenv("TMPDIR")) : "/tmp") + "/cortex-check.XXXXXX";
  if (!mkdtemp(tmpl.data()))
    return Status::IOError("cannot make a folder for plugin copies: " +
                           std::string(strerror(errno)));
  ro.cache_dir = tmpl;
  ro.env = options.env;
  ro.audit = std::move(audit);
  ro.log_events = false;
  {
    ExpertRegistry registry(ro);
    registry.Rescan();
    fn(registry);
  }
  std::error_code ec;
  fs::remove_all(tmpl, ec);
  return Status::OK();
}
}  // namespace

Status CheckConfig(const Config& config, const DaemonOptions& options,
                   std::vector<std::string>* warnings) {
  std::vector<std::string> errors;
  auto keep = [&](const Status& st) {
    if (!st.ok()) errors.push_back(st.message());
  };
  Result<RuleSet> rules = RuleSet::Compile(config.rules, config.source);
  keep(rules.status());
  std::string why;
  keep(MakeEngine(config.router.backend, &why).status().WithContext(config.source));
  // Folders a start would use: one that exists must already be safe (nothing is created).
  Env* env = Env::Default();
  auto folder = [&](const std::string& key, const std::string& dir) {
    FileInfo fi;
    if (dir.empty() || !env->Stat(dir, &fi).ok() || !fi.exists) return;
    keep(env->MakePrivateDir(dir, false).WithContext(key));
  };
  folder("store.path", fs::path(config.store.path).parent_path().string());
  folder("daemon.socket", fs::path(config.daemon.socket).parent_path().string());

  // Every plugin loaded and every configured expert created, in hosts, as a start does.
  keep(WithScratchRegistry(
      config, options,
      [&](const ExpertEvent& e) {
        if (e.event == "refused" || e.event == "unavailable")
          warnings->push_back(fmt::format("plugin {}{}: {}", e.file,
                                          e.expert.empty() ? "" : " (" + e.expert + ")", e.detail));
      },
      [&](ExpertRegistry& registry) {
        keep(registry.Configure(config));
        for (const auto& m :
             RuleExpertsMissing(config, [&](const std::string& n) { return !!registry.Find(n); }))
          warnings->push_back(fmt::format(
              "{}: rule {} names expert '{}', which is not loaded (loaded: {}); {}", config.source,
              m.rules, m.expert,
              [&] {
                std::string have;
                for (const auto& e : registry.Active())
                  have += (have.empty() ? "" : ", ") + e->name();
                return have.empty() ? std::string("none") : have;
              }(),
              m.effect));
      }));
  if (!errors.empty()) return Status::InvalidArgument(JoinLines(errors));
  return Status::OK();
}

Status FillExpertDefaults(const DaemonOptions& options, Config* config) {
  Status configured;
  Status st = WithScratchRegistry(
      *config, options, [](const ExpertEvent&) {},
      [&](ExpertRegistry& registry) {
        if (!(configured = registry.Configure(*config)).ok()) return;
        for (auto& e : config->experts) {
          std::shared_ptr<Expert> x = registry.Find(e.name);
          if (!x) continue;
          const Manifest& m = x->manifest();
          if (!e.description) e.description = m.description;
          if (!e.keywords) e.keywords = m.keywords;
          if (!e.examples) e.examples = m.examples;
          if (!e.capacity) e.capacity = m.capacity;
          if (!e.timeout_s) e.timeout_s = m.timeout_s;
        }
      });
  return st.ok() ? configured : st;
}

Status CheckConfigFile(const std::string& path, const DaemonOptions& options,
                       std::vector<std::string>* warnings) {
  std::vector<std::string> errors;
  Result<Config> cfg =
      path.empty() ? Result<Config>(DefaultConfig()) : LoadConfigFileForCheck(path, &errors);
  if (!cfg.ok()) return cfg.status();  // unreadable: nothing more to check
  if (Status st = CheckConfig(cfg.value(), options, warnings); !st.ok())
    for (std::string& l : SplitLines(st.message())) errors.push_back(std::move(l));
  if (errors.empty()) return Status::OK();
  // In the file's order: "FILE:LINE: ..." by line, then errors that name no line.
  auto line_of = [](const std::string& e) {
    for (size_t c = e.find(':'); c != std::string::npos; c = e.find(':', c + 1)) {
      size_t d = c + 1;
      while (d < e.size() && std::isdigit(static_cast<unsigned char>(e[d]))) ++d;
      if (d > c + 1 && d < e.size() && e[d] == ':') return std::stol(e.substr(c + 1, d - c - 1));
    }
    return std::numeric_limits<long>::max();
  };
  std::stable_sort(errors.begin(), errors.end(), [&](const std::string& a, const std::string& b) {
    return line_of(a) < line_of(b);
  });
  return Status::InvalidArgument(JoinLines(errors));
}

Status EveryConfigError(const Status& first, const std::string& path,
                        const DaemonOptions& options) {
  if (first.ok() || first.code() != Status::Code::kInvalidArgument) return first;
  std::vector<std::string> ignored;
  Status all = CheckConfigFile(path, options, &ignored);
  return all.ok() ? first : all;
}

}  // namespace cortex
