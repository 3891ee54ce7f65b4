#include "cortex/daemon.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "cluster.h"
#include "cortex/cluster.h"
#include "cortex/experts.h"
#include "cortex/learner.h"
#include "cortex/log.h"
#include "cortex/paths.h"
#include "cortex/router.h"
#include "cortex/store.h"
#include "cortex/wire.h"
#include "crash_marker.h"
#include "metrics.h"
#include "notify.h"
#include "pipeline.h"
#include "server.h"
#include "trainer.h"

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
  bool users = false;  // a rule of the user's file names it (else only built-in ones do)
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
               (r.builtin ? " (built-in)"
                : r.line  ? fmt::format(" (line {})", r.line)
                          : "");
    m.users |= !r.builtin;
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

// A Unix socket's path fits sockaddr_un: checked before anything is made, by a start
// and by --check-config alike.
Status CheckSocketPath(const std::string& path) {
  constexpr size_t kMax = sizeof(sockaddr_un{}.sun_path) - 1;
  if (path.size() <= kMax) return Status::OK();
  return Status::InvalidArgument(fmt::format(
      "daemon.socket: the path is too long ({} bytes, at most {}): {}", path.size(), kMax, path));
}

// The registry's options from a config: the same for a start and for --check-config.
Status RegistryOptionsFor(const Config& c, const DaemonOptions& o, ExpertRegistry::Options* ro) {
  std::string bundled = o.bundled_plugin_dir.empty() ? BundledPluginDir() : o.bundled_plugin_dir;
  // plugins.bundled: false leaves out the specialists, not the configurable plugins
  // (command), which are part of cortexd.
  if (bundled.empty()) {
    LogWarn("no bundled plugin folder next to the executable");
  } else {
    ro->dirs.push_back(bundled);
    if (!c.plugins.bundled) ro->core_only_dir = bundled;
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
  if (!ro->in_process)
    CORTEX_RETURN_IF_ERROR(
        CheckTrustedPath(ro->host_exe, false).WithContext("refusing to run the plugin host"));
  ro->host_env = c.plugins.env;
  ro->load_timeout_s = c.plugins.load_timeout_s;
  ro->supervision.quarantine_after = c.plugins.quarantine_after;
  ro->supervision.backoff_s = c.plugins.restart_backoff_s;
  ro->supervision.memory_limit = c.plugins.memory_limit;
  return Status::OK();
}

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
      CORTEX_LIVE("training.feedback_per_hour", training.feedback_per_hour),
      CORTEX_LIVE("training.keep_versions", training.keep_versions),
      CORTEX_LIVE("training.checkpoint_every", training.checkpoint_every),
      CORTEX_LIVE("daemon.shutdown_grace", daemon.shutdown_grace_s),
      CORTEX_LIVE("daemon.max_queued", daemon.max_queued),
  };
#undef CORTEX_LIVE
  return kLive;
}

// A node's name unless daemon.node gives one: the host's, and a hash of the socket's path
// (FNV-1a), so that two daemons on one host differ and a restart keeps its name.
std::string DefaultNodeName(const std::string& socket) {
  char host[256] = {0};
  if (gethostname(host, sizeof host - 1) != 0 || !host[0]) std::snprintf(host, sizeof host, "node");
  std::string name;
  for (const char* c = host; *c && name.size() < 48; ++c)
    name += std::isalnum(static_cast<unsigned char>(*c)) || *c == '-' || *c == '.' ? *c : '-';
  uint32_t h = 2166136261u;
  for (unsigned char c : socket) h = (h ^ c) * 16777619u;
  return fmt::format("{}-{:08x}", name, h);
}

class DaemonImpl : public Daemon, public RequestHandler {
 public:
  DaemonImpl(Config config, DaemonOptions options)
      : config_(std::move(config)), options_(std::move(options)), env_(options_.env) {}

  ~DaemonImpl() override {
    StopStartBeats();  // a start that failed half-way
    {  // a slot freed from now on (a host torn down below, a late plugin thread) wakes nobody
      std::lock_guard<std::mutex> l(slot_waker_->mu);
      slot_waker_->pipeline = nullptr;
      slot_waker_->cluster = nullptr;
    }
    if (lock_fd_ >= 0) {
      SetCrashMarkerFd(-1);
      close(lock_fd_);
    }
    if (inotify_fd_ >= 0) close(inotify_fd_);
    if (signal_fd_ >= 0) close(signal_fd_);
    // Connections first (they call into the pipeline), then the pipeline (it holds
    // experts), then the experts: the plugin copies go with the hosts that ran them.
    server_.reset();
    metrics_server_.reset();  // (stopped already: no scrape reads the pipeline from here)
    cluster_.reset();         // (its threads call into the pipeline)
    pipeline_.reset();
    registry_.reset();
    if (!cache_dir_.empty()) {
      std::error_code ec;
      fs::remove_all(cache_dir_, ec);
    }
  }

  Status Start() override {
    start_mono_ = env_->MonotonicMicros();
    running_ = config_;
    CORTEX_RETURN_IF_ERROR(CheckSocketPath(config_.daemon.socket));
    // The socket folder also holds the plugin cache: it is made (or checked) private
    // before anything is put in it, so no other user can plant or swap a file there.
    CORTEX_RETURN_IF_ERROR(
        env_->MakePrivateDir(fs::path(config_.daemon.socket).parent_path().string(), true)
            .WithContext("daemon.socket"));
    // The whole config (rules, backend, every expert's settings) is accepted before the
    // store or its lock is made: a refused start leaves no store behind.
    Result<RuleSet> rules = RuleSet::Compile(config_.rules, config_.source);
    if (!rules.ok()) return rules.status();
    auto score_engine = MakeEngine(config_.router.backend, &backend_why_);
    if (!score_engine.ok()) return score_engine.status().WithContext(config_.source);
    std::string ignored;
    auto train_engine = MakeEngine(config_.router.backend, &ignored);
    if (!train_engine.ok()) return train_engine.status().WithContext(config_.source);
    CORTEX_RETURN_IF_ERROR(PrepareExperts());
    CORTEX_RETURN_IF_ERROR(PrepareStore());
    FlushExpertEvents();
    CORTEX_RETURN_IF_ERROR(PrepareRouting(std::move(rules).value(), std::move(score_engine).value(),
                                          std::move(train_engine).value()));
    CORTEX_RETURN_IF_ERROR(Recover());
    server_ = std::make_unique<Server>(
        this, ServerLimits{config_.daemon.max_connections, config_.daemon.max_request_bytes,
                           config_.daemon.allow_group, config_.daemon.idle_timeout_s});
    CORTEX_RETURN_IF_ERROR(server_->Listen(config_.daemon.socket));
    if (!config_.metrics.listen.empty()) {
      std::string host;
      int port = 0;
      CORTEX_RETURN_IF_ERROR(ParseMetricsListen(config_.metrics.listen, &host, &port));
      auto ms = MetricsServer::Start(host, port, [this] { return metrics_.Render(Gauges()); });
      if (ms.ok()) {
        metrics_server_ = std::move(ms).value();
        LogInfo("metrics at http://{}/metrics", metrics_server_->address());
      } else {
        // Tasks matter more than their metrics: a port someone else holds (any local user
        // can take one) leaves cortexd running without the endpoint, and says so.
        metrics_error_ = "metrics.listen: " + ms.status().message();
        LogError("{}; cortexd runs without /metrics", metrics_error_);
        RecordEvent("metrics", metrics_error_);
      }
    }
    SetupInotify();
    pipeline_->Start();
    StopStartBeats();
    if (cluster_) cluster_->Start();
    loader_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "loader");
      LoadLoop();
    });
    trainer_->Start();
    LogInfo("cortexd ready: config {}, socket {}, store {}, {} experts, {} workers, backend {}",
            config_.source, config_.daemon.socket, store_->Path(), registry_->Active().size(),
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
    if (pipeline_) pipeline_->Wake();
    if (trainer_) trainer_->Wake();
  }

  // ---- RequestHandler (called from the server's intake and request threads) ----------

  const DaemonConfig& limits() const override { return config_.daemon; }

  Status Submit(const std::string& text, const Tags& tags, double wait_s,
                std::string* id) override {
    return pipeline_->Submit(text, tags, wait_s, id);
  }
  void SubmitMany(std::vector<Submission>* batch) override { pipeline_->SubmitMany(batch); }
  bool Unwatch(const std::string& id, const std::shared_ptr<TaskWatch>& watch) override {
    return pipeline_->Unwatch(id, watch);
  }
  bool Stopping() const override { return stop_.load(); }
  Status Route(const std::string& text, const Tags& tags, Decision* d) override {
    return pipeline_->Route(text, tags, d);
  }
  Status Cancel(const std::string& id) override { return pipeline_->Cancel(id); }
  Status WaitDone(const std::string& id, double timeout_s, Task* t, bool* done) override {
    return pipeline_->WaitDone(id, timeout_s, t, done);
  }

  Store* store() override { return store_.get(); }
  ExpertRegistry* registry() override { return registry_.get(); }

  json Status_() override {
    std::vector<std::pair<std::string, long>> counts;
    // A store that does not answer (a database outage) is said so, not shown as empty.
    const Status read = store_->CountByState(&counts);
    json by_state = read.ok() ? json::object() : json(nullptr);
    for (const auto& [s, c] : counts) by_state[s] = c;
    const int schema = read.ok() ? store_->SchemaVersion() : 0;  // (not a second wait)
    const size_t queued = pipeline_->QueueDepth();
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
            {"training", trainer_->Status_()},
            {"store", store_->Path()},
            {"store_path", store_->Path()},
            {"plugin_dir", config_.plugins.dir},
            {"plugin_dirs", watch_dirs_},
            {"store_error", pipeline_->StoreError()},
            {"store_read_error", read.ok() ? json(nullptr) : json(read.message())},
            {"schema_version", schema > 0 ? json(schema) : json(nullptr)},
            {"socket", config_.daemon.socket},
            {"metrics", metrics_server_ ? json("http://" + metrics_server_->address() + "/metrics")
                                        : json(nullptr)},
            {"metrics_error", metrics_error_.empty() ? json(nullptr) : json(metrics_error_)},
            {"config", ConfigSource()},
            {"experts", active.size()},
            {"isolation", config_.plugins.isolation},
            {"rules", router->rules().size()},
            {"workers", config_.daemon.workers},
            {"exploration", router->options().exploration},
            {"tasks", by_state},
            {"node", cluster_ ? json(node_) : json(nullptr)},
            {"trainer_node", cluster_ ? json(cluster_->TrainerNode()) : json(nullptr)},
            {"nodes", cluster_ ? cluster_->Nodes() : json(nullptr)}};
  }

  std::string Node() const override { return node_; }
  json RemoteExperts() override { return cluster_ ? cluster_->RemoteExperts() : json::array(); }

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
    }
    trainer_->SetSchedule(run.training.interval_s, run.training.min_new_outcomes);
    trainer_->SetRetention(run.training.keep_versions, run.training.checkpoint_every);
    {
      std::lock_guard<std::mutex> l(running_mu_);
      running_ = run;
    }
    pipeline_->SetLimits(run.daemon.max_queued, run.router.max_attempts,
                         run.daemon.shutdown_grace_s);
    WarnUnknownRuleExperts(run);
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
    if (!config_.store.url.empty()) {
      // The database is shared and has no file here: the lock that keeps a second cortexd
      // off this socket, and holds the crash marker, sits beside the socket.
      CORTEX_RETURN_IF_ERROR(TakeLock(config_.daemon.socket + ".lock", "daemon.socket",
                                      "the socket " + config_.daemon.socket));
      Result<std::unique_ptr<Store>> s = OpenStore(config_.store.url);
      if (!s.ok()) return s.status();
      store_ = std::move(s).value();
      // A node of the cluster on that database: its tasks are its own from here on.
      node_ = config_.daemon.node.empty() ? DefaultNodeName(config_.daemon.socket)
                                          : config_.daemon.node;
      CORTEX_RETURN_IF_ERROR(store_->SetNode(node_));
      Result<std::unique_ptr<ClusterLink>> link = OpenClusterLink(config_.store.url, node_);
      if (!link.ok()) return link.status();
      cluster_link_ = std::move(link).value();
      // A heartbeat before recovery: a node that restarts within the timeout is not
      // declared lost (its tasks taken over) while it resumes them.
      NodeInfo me;
      me.node = node_;
      me.socket = config_.daemon.socket;
      me.pid = static_cast<int>(getpid());
      me.started_at = env_->NowUnix();
      CORTEX_RETURN_IF_ERROR(cluster_link_->Heartbeat(me, &node_was_lost_));
      LogInfo("cluster: node {} on {}", node_, store_->Path());
      // Until the cluster's own thread beats (once the start is done), this one keeps the
      // node's heartbeat fresh: a start slower than node_timeout (a loaded machine, a
      // sanitizer build) would otherwise be declared lost by the others. The link (its
      // calls serialised by its own mutex) outlives the thread: it moves into cluster_,
      // and StopStartBeats comes before cluster_ starts or goes.
      ClusterLink* beating = cluster_link_.get();
      const auto every =
          std::chrono::duration<double>(std::max(0.1, config_.daemon.node_timeout_s / 4));
      start_beats_ = std::thread([this, me, beating, every] {
        std::unique_lock<std::mutex> l(start_beats_mu_);
        while (!start_beats_cv_.wait_for(l, every, [this] { return start_beats_done_; })) {
          bool ignored = false;
          (void)beating->Heartbeat(me, &ignored);
        }
      });
      return Status::OK();
    }
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
      CORTEX_RETURN_IF_ERROR(TakeLock(path + ".lock", "store.path", "the store " + path));
    }
    Result<std::unique_ptr<Store>> s = OpenStore(path);
    if (!s.ok()) return s.status();
    store_ = std::move(s).value();
    return Status::OK();
  }

  // Takes the lock file `lock` (`key` names the setting it comes from) for this daemon
  // alone, and the crash marker a predecessor left in it.
  Status TakeLock(const std::string& lock, const std::string& key, const std::string& what) {
    CORTEX_RETURN_IF_ERROR(env_->MakePrivateFile(lock).WithContext(key));
    lock_fd_ = open(lock.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (lock_fd_ < 0) return Status::IOError("cannot open " + lock + ": " + strerror(errno));
    // A predecessor that was just killed can hold the lock a moment longer (its exit is
    // not instant under load), so wait briefly before refusing; a live daemon keeps it.
    bool locked = false;
    for (int i = 0; i < 30 && !(locked = flock(lock_fd_, LOCK_EX | LOCK_NB) == 0); ++i)
      usleep(100000);
    if (!locked)
      return Status::FailedPrecondition("another cortexd is using " + what + " (lock " + lock +
                                        " is held)");
    // A predecessor that crashed (not one killed from outside) left which signal it was.
    crash_ = TakeCrashMarker(lock_fd_);
    SetCrashMarkerFd(lock_fd_);
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

  // The registry: every plugin loaded and every configured expert created. Before the
  // store exists its events wait in memory (FlushExpertEvents).
  Status PrepareExperts() {
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
    ro.supervision.on_slot_free = [w = slot_waker_] {
      std::lock_guard<std::mutex> l(w->mu);
      if (w->pipeline) w->pipeline->SlotFreed();
      if (w->cluster) w->cluster->SlotFreed();
    };
    ro.audit = [this](const ExpertEvent& e) {
      {
        std::lock_guard<std::mutex> l(early_events_mu_);
        if (!store_ready_) return early_events_.push_back(e);
      }
      Status st = store_->RecordExpertEvent(e);
      if (!st.ok()) LogWarn("audit: {}", st.ToString());
    };
    registry_ = std::make_unique<ExpertRegistry>(ro);
    registry_->Rescan();
    return registry_->Configure(config_);
  }

  void StopStartBeats() {
    {
      std::lock_guard<std::mutex> l(start_beats_mu_);
      start_beats_done_ = true;
    }
    start_beats_cv_.notify_all();
    if (start_beats_.joinable()) start_beats_.join();
  }

  // The registry's events from before the store was open, in order.
  void FlushExpertEvents() {
    std::vector<ExpertEvent> events;
    {
      std::lock_guard<std::mutex> l(early_events_mu_);
      events.swap(early_events_);
      store_ready_ = true;
    }
    for (const auto& e : events)
      if (Status st = store_->RecordExpertEvent(e); !st.ok()) LogWarn("audit: {}", st.ToString());
  }

  Status PrepareRouting(RuleSet rules, std::unique_ptr<GatingEngine> score_engine,
                        std::unique_ptr<GatingEngine> train_engine) {
    // The learner over the gating model's two engines: one scores, one trains in the
    // background.
    LearnerOptions lo;
    // (The model's own seed stays the default: router.seed only draws exploration. The
    // untrained weights and the replay sampler must be the same at every start, or a
    // changed seed would change the live weights and no decision could be rebuilt.)
    lo.online_updates = config_.training.online;
    lo.train.epochs = config_.training.epochs;
    lo.population = config_.training.population;
    lo.train.cancel = &stop_;  // a stop ends a retrain within one minibatch
    learner_ = std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), std::move(score_engine),
                                         std::move(train_engine));
    trainer_ = std::make_unique<Trainer>(
        store_.get(), learner_, env_,
        [this](const std::string& e, const std::string& d) { RecordEvent(e, d); }, &stop_,
        config_.training.interval_s, config_.training.min_new_outcomes, &metrics_);
    trainer_->SetRetention(config_.training.keep_versions, config_.training.checkpoint_every);
    CORTEX_RETURN_IF_ERROR(trainer_->LoadLiveModel());
    router_ = std::make_shared<Router>(RouterOptionsFrom(config_.router), std::move(rules),
                                       MakeGatingScorer(learner_), learner_->hasher());
    PipelineOptions po;
    po.metrics = &metrics_;
    po.workers = config_.daemon.workers;
    po.max_queued = config_.daemon.max_queued;
    po.max_attempts = config_.router.max_attempts;
    po.shutdown_grace_s = config_.daemon.shutdown_grace_s;
    pipeline_ = std::make_unique<Pipeline>(
        store_.get(), registry_.get(), [this] { return CurrentRouter(); }, env_,
        [this] { trainer_->Wake(); }, stop_, po);
    if (cluster_link_) {
      ClusterOptions co;
      co.node = node_;
      co.socket = config_.daemon.socket;
      co.timeout_s = config_.daemon.node_timeout_s;
      co.started_at = env_->NowUnix();
      co.was_lost = node_was_lost_;
      cluster_ =
          std::make_unique<Cluster>(co, std::move(cluster_link_), store_.get(), registry_.get(),
                                    pipeline_.get(), [this] { trainer_->ReloadLive(); });
      pipeline_->SetCluster(cluster_.get());
      trainer_->SetCluster(
          [this] {
            // (Its own row says so only while its link holds the lock: as good a word.)
            const std::string who = cluster_->TrainerNode();
            if (cluster_->Trainer() || who == node_) return std::string();
            return who.empty() ? std::string("none") : who;
          },
          [this](int version) { cluster_->ModelChanged(version); });
    }
    {
      std::lock_guard<std::mutex> l(slot_waker_->mu);
      slot_waker_->pipeline = pipeline_.get();
      slot_waker_->cluster = cluster_.get();
    }
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
    pipeline_->Resume(std::move(rec.requeue));
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
      pipeline_->Wake();  // a new expert may unblock queued tasks
    }
  }

  void Shutdown() {
    NotifyStopping();
    if (metrics_server_) metrics_server_->Stop();  // (connections may still read its address)
    store_->StopReports();  // a report takes seconds on a large store: not the stop's time
    server_->StopAccepting();
    { std::lock_guard<std::mutex> l(load_mu_); }  // the loader is waiting or sees stop_
    load_cv_.notify_all();
    if (loader_.joinable()) loader_.join();
    pipeline_->StopRouting();
    pipeline_->StopRunning();
    trainer_->Stop();  // after the running tasks: it learns their outcomes, then checkpoints
    server_->CloseConnections();
    if (cluster_) {
      cluster_->Stop();  // what this node did not start goes to the others
      LogInfo("cortexd stopped");
      return;
    }
    const size_t left = pipeline_->Left();
    LogInfo("cortexd stopped; {} task(s) stay queued in the store for the next start", left);
  }

  // ---- routing and execution ------------------------------------------------------

  // What /metrics reads at each scrape, beside the counters Metrics keeps.
  std::string Gauges() {
    std::string g;
    Metrics::Family(&g, "cortex_queue_depth", "gauge", "Tasks waiting to run.");
    Metrics::Sample(&g, "cortex_queue_depth", {}, pipeline_->QueueDepth());
    Metrics::Family(&g, "cortex_model_version", "gauge",
                    "The live routing model's version (0: untrained).");
    Metrics::Sample(&g, "cortex_model_version", {}, learner_->live_version());
    const auto experts = registry_->List();
    Metrics::Family(&g, "cortex_plugin_host_restarts_total", "counter",
                    "Plugin hosts started again after the first, by expert.");
    for (const auto& e : experts)
      Metrics::Sample(&g, "cortex_plugin_host_restarts_total", {{"expert", e.name}},
                      e.health.restarts);
    Metrics::Family(&g, "cortex_expert_quarantined", "gauge",
                    "1 while an expert is quarantined after repeated crashes.");
    for (const auto& e : experts)
      Metrics::Sample(&g, "cortex_expert_quarantined", {{"expert", e.name}},
                      e.state == "quarantined" ? 1 : 0);
    return g;
  }

  std::shared_ptr<Router> CurrentRouter() {
    std::lock_guard<std::mutex> l(router_mu_);
    return router_;
  }

  // ---- learning (trainer.cc) ------------------------------------------------------

  // The file the running config came from (a reload may have found one since the start).
  std::string ConfigSource() {
    std::lock_guard<std::mutex> l(running_mu_);
    return running_.source;
  }

  // An entry in the audit's event log (`cortexctl events`) that is about no one expert.
  void RecordEvent(const std::string& event, const std::string& detail) {
    Status st = store_->RecordExpertEvent({env_->NowUnix(), "", "", event, detail});
    if (!st.ok()) LogWarn("audit: {}", st.ToString());
  }

  Status Retrain(bool wait, const std::function<bool(const std::string&)>& progress,
                 json* result) override {
    Status st = trainer_->Retrain(wait, progress, result);
    if (st.ok() && wait && !result->value("skipped", false)) pipeline_->StoreWritten();
    return st;
  }
  Status Models(json* result) override { return trainer_->Models(result); }
  Status Feedback(const std::string& id, const cortex::Feedback& f, json* result) override {
    int per_hour;
    {
      std::lock_guard<std::mutex> l(running_mu_);
      per_hour = running_.training.feedback_per_hour;
    }
    FeedbackResult r;
    CORTEX_RETURN_IF_ERROR(store_->AddFeedback(id, f, per_hour, &r));
    pipeline_->StoreWritten();
    if (r.learn_seq > 0) trainer_->Wake();  // the live model learns from it now
    *result = {{"id", id},
               {"quality", f.quality},
               {"by", f.by},
               {"attempt", r.attempt},
               {"expert", r.expert},
               {"reward", r.reward},
               // With training.online off (a start-time setting), only a retrain learns.
               {"learned", r.learn_seq > 0 && config_.training.online}};
    if (r.learn_seq > 0) (*result)["learn_seq"] = r.learn_seq;
    return Status::OK();
  }
  Status Explain(const Task& t, json* result) override { return trainer_->Explain(t, result); }
  Status Rollback(int version, bool force, json* result) override {
    Status st = trainer_->Rollback(version, force, result);
    if (st.ok()) pipeline_->StoreWritten();
    return st;
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
  std::mutex early_events_mu_;
  std::vector<ExpertEvent> early_events_;  // the registry's, until the store is open
  bool store_ready_ = false;
  std::string cache_dir_;  // private copies of the plugin files, removed at exit
  std::unique_ptr<Server> server_;
  std::mutex router_mu_;
  std::shared_ptr<Router> router_;
  std::shared_ptr<Learner> learner_;
  std::string backend_why_;
  std::unique_ptr<Trainer> trainer_;
  Metrics metrics_;
  std::unique_ptr<MetricsServer> metrics_server_;  // with metrics.listen set
  std::string metrics_error_;                      // why it is not served, then

  // Hosts and plugin threads free slots from their own threads, possibly after this
  // object is gone: they reach the pipeline only through this, which the destructor clears.
  struct SlotWaker {
    std::mutex mu;
    Pipeline* pipeline = nullptr;
    Cluster* cluster = nullptr;  // in a cluster: a free slot may claim shared work
  };
  std::shared_ptr<SlotWaker> slot_waker_ = std::make_shared<SlotWaker>();
  std::mutex reload_mu_;  // one reload at a time (SIGHUP and `cortexctl reload`)
  std::thread loader_;
  std::mutex load_mu_;
  std::condition_variable load_cv_;
  bool reload_wanted_ = false, rescan_wanted_ = false;
  std::mutex running_mu_;
  Config running_;  // the settings in force: the start's, plus live reloads (running_mu_)
  std::unique_ptr<Pipeline> pipeline_;
  // A cluster (store.url): this node's link to the others, then the node itself.
  std::string node_;
  std::unique_ptr<ClusterLink> cluster_link_;  // until PrepareRouting makes cluster_
  // Heartbeats while the start runs (PrepareStore to the cluster's own thread).
  std::thread start_beats_;
  std::mutex start_beats_mu_;
  std::condition_variable start_beats_cv_;
  bool start_beats_done_ = false;  // under start_beats_mu_
  bool node_was_lost_ = false;
  std::unique_ptr<Cluster> cluster_;
  std::atomic<bool> stop_{false};  // no new work
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
  // And what a start would refuse of the paths themselves.
  keep(CheckSocketPath(config.daemon.socket));
  if (FileInfo fi; config.store.url.empty() && env->Stat(config.store.path, &fi).ok() &&
                   fi.exists && !fi.is_regular)
    errors.push_back("store.path: " + config.store.path + " is not a regular file");
  if (config.store.url.empty())
    folder("store.path", fs::path(config.store.path).parent_path().string());
  else
    keep(ProbeStore(config.store.url).WithContext("store.url"));
  folder("daemon.socket", fs::path(config.daemon.socket).parent_path().string());
  keep(CheckOwnFolder(fs::path(config.daemon.socket).parent_path().string())
           .WithContext("daemon.socket"));

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
              "{}rule {} names expert '{}', which is not loaded (loaded: {}); {}",
              m.users ? config.source + ": " : "", m.rules, m.expert,
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
