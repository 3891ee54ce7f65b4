#define BOOST_DLL_USE_STD_FS
#include "cortex/experts.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/dll/shared_library.hpp>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <set>
#include <thread>

#include <fmt/ranges.h>

#include "cortex/log.h"
#include "cortex/plugin.h"

namespace cortex {

namespace fs = std::filesystem;

class PluginLibrary {
 public:
  boost::dll::shared_library lib;
  const cortex_plugin_api* api = nullptr;
  Manifest manifest;
  std::string file;
};

struct ExpertRegistry::FileRecord {
  FileInfo sig;
  std::string plugin;   // set when loaded
  std::string refused;  // set when refused
};

namespace {

// Plugin-supplied strings are read with bounds: 256 entries of up to 4 KiB each.
std::string CStr(const char* s) { return s ? std::string(s, strnlen(s, 4096)) : std::string(); }
std::vector<std::string> CStrList(const char* const* list) {
  std::vector<std::string> out;
  for (; list && *list && out.size() < 256; ++list) out.push_back(CStr(*list));
  return out;
}

bool ValidName(const std::string& n) {
  return !n.empty() && n.size() <= 64 &&
         n.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-_.") == std::string::npos;
}

bool SameFile(const FileInfo& a, const FileInfo& b) {
  return a.inode == b.inode && a.mtime_ns == b.mtime_ns && a.size == b.size && a.mode == b.mode &&
         a.uid == b.uid;
}

std::string Octal(uint32_t mode) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04o", mode & 07777);
  return buf;
}

// Copies src to dst with mode 0700 so the loader maps a file nobody else can change.
Status CopyPrivate(const std::string& src, const std::string& dst) {
  std::error_code ec;
  fs::copy_file(src, dst, fs::copy_options::overwrite_existing, ec);
  if (ec) return Status::IOError("cannot copy " + src + ": " + ec.message());
  ::chmod(dst.c_str(), 0700);
  return Status::OK();
}

// One running attempt's state, shared by the waiting caller and the plugin's thread.
struct RunState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::atomic<int> cancelled{0};
  std::string output;
  bool truncated = false;
  cortex_result result{};
  std::string error;
  // Inputs the plugin sees, owned here so they outlive an abandoned wait.
  std::string id, text;
  std::vector<std::string> keys, values;
  std::vector<cortex_tag> tags;
  cortex_task task{};
  cortex_host host{};
};

int CancelledCb(void* ctx) { return static_cast<RunState*>(ctx)->cancelled.load(); }

void WriteCb(void* ctx, const char* data, size_t len) {
  auto* s = static_cast<RunState*>(ctx);
  if (!data || !len) return;
  std::lock_guard<std::mutex> l(s->mu);
  size_t room = kMaxExpertOutputBytes - std::min(kMaxExpertOutputBytes, s->output.size());
  if (len > room) {
    s->output.append(data, room);
    s->truncated = true;
  } else {
    s->output.append(data, len);
  }
}

int64_t NowMicros() { return Env::Default()->MonotonicMicros(); }

ExpertInfo InfoOf(const Expert& e, const std::string& state) {
  ExpertInfo i;
  i.name = e.name();
  i.version = e.manifest().version;
  i.plugin = e.plugin();
  i.file = e.file();
  i.state = state;
  i.description = e.manifest().description;
  i.keywords = e.manifest().keywords;
  i.inflight = e.inflight();
  i.capacity = e.manifest().capacity;
  i.timeout_s = e.manifest().timeout_s;
  return i;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Expert

Expert::Expert(std::shared_ptr<PluginLibrary> lib, void* instance, Manifest manifest,
               std::string plugin, std::string file, std::string fingerprint)
    : lib_(std::move(lib)),
      instance_(instance),
      manifest_(std::move(manifest)),
      plugin_(std::move(plugin)),
      file_(std::move(file)),
      fingerprint_(std::move(fingerprint)) {}

Expert::~Expert() {
  if (instance_) lib_->api->destroy(instance_);
}

double Expert::load() const {
  return std::min(1.0, static_cast<double>(inflight_.load()) / std::max(1, manifest_.capacity));
}

bool Expert::AcquireSlot(int64_t deadline_us, const std::atomic<bool>* stopping) {
  std::unique_lock<std::mutex> l(slot_mu_);
  while (inflight_.load() >= manifest_.capacity) {
    if (stopping && stopping->load()) return false;
    int64_t left = deadline_us - NowMicros();
    if (left <= 0) return false;
    slot_cv_.wait_for(l, std::chrono::microseconds(std::min<int64_t>(left, 100000)));
  }
  ++inflight_;
  return true;
}

void Expert::ReleaseSlot() {
  {
    std::lock_guard<std::mutex> l(slot_mu_);
    --inflight_;
  }
  slot_cv_.notify_one();
}

Outcome Expert::Run(const Task& task, const std::atomic<bool>* stopping) {
  Outcome out;
  const int64_t start = NowMicros();
  const int64_t deadline = start + static_cast<int64_t>(manifest_.timeout_s * 1e6);
  auto finish = [&](OutcomeKind k, std::string err) {
    out.kind = k;
    out.quality = 0;
    out.error = std::move(err);
    out.duration_s = (NowMicros() - start) / 1e6;
    return out;
  };
  if (!AcquireSlot(deadline, stopping))
    return finish(OutcomeKind::kRejected,
                  stopping && stopping->load()
                      ? "cortexd is stopping"
                      : "busy: all " + std::to_string(manifest_.capacity) + " slots in use");

  auto st = std::make_shared<RunState>();
  st->id = task.id;
  st->text = task.text;
  for (const auto& [k, v] : task.tags) {
    st->keys.push_back(k);
    st->values.push_back(v);
  }
  for (size_t i = 0; i < st->keys.size(); ++i)
    st->tags.push_back({st->keys[i].c_str(), st->values[i].c_str()});
  st->task = {st->id.c_str(), st->text.c_str(), st->tags.data(), st->tags.size(),
              static_cast<int64_t>(Env::Default()->NowUnix() * 1000 + manifest_.timeout_s * 1000)};
  st->host = {st.get(), &CancelledCb, &WriteCb};

  // The plugin runs on its own thread so a hung plugin cannot hold the caller past
  // its deadline; the thread keeps the expert (and its library) alive until it returns.
  try {
    std::thread([self = shared_from_this(), st] {
      cortex_result r = self->lib_->api->execute(self->instance_, &st->task, &st->host);
      {
        std::lock_guard<std::mutex> l(st->mu);
        st->result = r;
        if (r.error) st->error = r.error;
        st->done = true;
      }
      st->cv.notify_all();
      self->ReleaseSlot();
    }).detach();
  } catch (const std::system_error& e) {
    ReleaseSlot();
    return finish(OutcomeKind::kFailure, std::string("cannot start the expert: ") + e.what());
  }

  std::unique_lock<std::mutex> l(st->mu);
  while (!st->done) {
    int64_t left = deadline - NowMicros();
    if (left <= 0) break;
    st->cv.wait_for(l, std::chrono::microseconds(std::min<int64_t>(left, 100000)));
  }
  out.output = st->output;
  if (st->truncated) out.output += "\n[output truncated]";
  if (!st->done) {
    st->cancelled = 1;
    return finish(OutcomeKind::kTimeout,
                  "no result within " + fmt::format("{:g}", manifest_.timeout_s) + "s");
  }
  out.duration_s = (NowMicros() - start) / 1e6;
  switch (st->result.kind) {
    case CORTEX_OUTCOME_SUCCESS:
      out.kind = OutcomeKind::kSuccess;
      break;
    case CORTEX_OUTCOME_FAILURE:
      out.kind = OutcomeKind::kFailure;
      break;
    case CORTEX_OUTCOME_TIMEOUT:
      out.kind = OutcomeKind::kTimeout;
      break;
    case CORTEX_OUTCOME_CRASH:
      out.kind = OutcomeKind::kCrash;
      break;
    case CORTEX_OUTCOME_REJECTED:
      out.kind = OutcomeKind::kRejected;
      break;
    default:
      out.kind = OutcomeKind::kFailure;
      st->error = "the expert returned an unknown outcome kind " + std::to_string(st->result.kind);
  }
  double q = st->result.quality;
  const bool ok = out.kind == OutcomeKind::kSuccess;
  out.quality = (std::isnan(q) || q < 0) ? (ok ? 1.0 : 0.0) : std::min(1.0, q);
  out.error = st->error.substr(0, 1024);
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
  if (event == "refused")
    LogWarn("plugin {}: refused: {}", file, detail);
  else
    LogInfo("expert {} {} ({}){}", expert.empty() ? "?" : expert, event, file,
            detail.empty() ? "" : ": " + detail);
  if (options_.audit) options_.audit({options_.env->NowUnix(), expert, file, event, detail});
}

Status ExpertRegistry::CheckSafe(const std::string& path, bool is_dir) {
  FileInfo fi;
  CORTEX_RETURN_IF_ERROR(options_.env->Stat(path, &fi));
  if (!fi.exists) return Status::NotFound(path + " does not exist");
  if (is_dir ? !fi.is_dir : !fi.is_regular)
    return Status::FailedPrecondition(path +
                                      (is_dir ? " is not a directory" : " is not a regular file"));
  uint32_t me = options_.env->CurrentUid();
  if (fi.uid != me && fi.uid != 0)
    return Status::FailedPrecondition("unsafe ownership: " + path + " is owned by uid " +
                                      std::to_string(fi.uid) + ", not by you (uid " +
                                      std::to_string(me) + ") or root");
  if (fi.mode & 022)
    return Status::FailedPrecondition("unsafe permissions: " + path + " is writable by " +
                                      ((fi.mode & 002) ? "others" : "its group") + " (mode " +
                                      Octal(fi.mode) + "); chmod go-w it");
  return Status::OK();
}

Status ExpertRegistry::LoadFile(const std::string& path, std::shared_ptr<PluginLibrary>* out) {
  CORTEX_RETURN_IF_ERROR(CheckSafe(path, false));
  auto lib = std::make_shared<PluginLibrary>();
  lib->file = path;
  // Load a private copy: the original may be replaced or rewritten while we run it.
  static std::atomic<uint64_t> counter{0};
  std::string copy = options_.cache_dir + "/" + fs::path(path).filename().string() + "." +
                     std::to_string(::getpid()) + "." + std::to_string(++counter);
  CORTEX_RETURN_IF_ERROR(CopyPrivate(path, copy));
  std::error_code ec;
  lib->lib.load(copy, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local, ec);
  const char* dlerr = ec ? ::dlerror() : nullptr;
  ::unlink(copy.c_str());  // the mapping stays valid; nothing to clean up later
  if (ec) {
    std::string why = dlerr ? dlerr : ec.message();
    if (size_t p = why.find(copy); p != std::string::npos) why.replace(p, copy.size(), path);
    return Status::FailedPrecondition("cannot load shared library: " + why);
  }
  if (!lib->lib.has(CORTEX_PLUGIN_ENTRY_NAME))
    return Status::FailedPrecondition(std::string("not a Cortex plugin: no ") +
                                      CORTEX_PLUGIN_ENTRY_NAME + " entry point");
  auto entry = lib->lib.get<const cortex_plugin_api*()>(CORTEX_PLUGIN_ENTRY_NAME);
  const cortex_plugin_api* api = entry();
  if (!api) return Status::FailedPrecondition("the plugin's entry point returned no API table");
  if (api->abi_version != CORTEX_PLUGIN_ABI_VERSION)
    return Status::FailedPrecondition(
        "built for plugin ABI v" + std::to_string(api->abi_version) + ", this cortexd speaks v" +
        std::to_string(CORTEX_PLUGIN_ABI_VERSION) + "; rebuild it against this SDK");
  if (api->struct_size < sizeof(cortex_plugin_api) || !api->manifest || !api->create ||
      !api->destroy || !api->execute)
    return Status::FailedPrecondition("incomplete API table (missing manifest or functions)");
  CORTEX_RETURN_IF_ERROR(ManifestFromC(api->manifest, &lib->manifest));
  lib->api = api;
  *out = std::move(lib);
  return Status::OK();
}

Status ManifestFromC(const cortex_manifest* m, Manifest* out) {
  Manifest man;
  man.name = CStr(m->name);
  if (!ValidName(man.name))
    return Status::FailedPrecondition("manifest name '" + man.name +
                                      "' is not 1-64 characters of a-z, 0-9, '-', '_', '.'");
  man.version = CStr(m->version);
  if (man.version.empty()) return Status::FailedPrecondition("manifest has no version");
  man.description = CStr(m->description);
  man.keywords = CStrList(m->keywords);
  man.examples = CStrList(m->examples);
  man.config_keys = CStrList(m->config_keys);
  if (m->capacity < 1 || m->capacity > 1024)
    return Status::FailedPrecondition("manifest capacity must be 1..1024");
  man.capacity = static_cast<int>(m->capacity);
  man.timeout_s = m->timeout_ms ? m->timeout_ms / 1000.0 : 60.0;
  man.requires_config = (m->flags & CORTEX_MANIFEST_REQUIRES_CONFIG) != 0;
  *out = std::move(man);
  return Status::OK();
}

void ExpertRegistry::Rescan() {
  std::lock_guard<std::mutex> l(mu_);
  std::set<std::string> seen;
  bool changed = false;
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
      std::shared_ptr<PluginLibrary> lib;
      Status st = LoadFile(path, &lib);
      if (st.ok()) {
        auto dup = plugins_.find(lib->manifest.name);
        if (dup != plugins_.end())
          st = Status::AlreadyExists("a plugin named '" + lib->manifest.name +
                                     "' is already loaded from " + dup->second->file);
      }
      if (!st.ok()) {
        rec->refused = st.message();
        Audit(lib ? lib->manifest.name : "", path, "refused", st.message());
        continue;
      }
      rec->plugin = lib->manifest.name;
      Audit(lib->manifest.name, path, replacing ? "replaced" : "loaded",
            "plugin " + lib->manifest.name + " " + lib->manifest.version);
      plugins_[lib->manifest.name] = std::move(lib);
    }
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
  for (size_t i = 0; i < instances.size(); ++i) {
    const ExpertConfig& ec = instances[i];
    const std::string path = "experts[" + std::to_string(i) + "]";
    auto where = [&](int line) { return source + ":" + std::to_string(line) + ": "; };
    auto pit = plugins_.find(ec.plugin);
    if (pit == plugins_.end()) {
      std::string have;
      for (const auto& [n, _] : plugins_) have += (have.empty() ? "" : ", ") + n;
      return Status::InvalidArgument(
          where(ec.line) + path + ".plugin: no plugin named '" + ec.plugin +
          "' is loaded (loaded: " + (have.empty() ? "none" : have) + ")");
    }
    const auto& lib = pit->second;
    std::set<std::string> accepted(lib->manifest.config_keys.begin(),
                                   lib->manifest.config_keys.end());
    for (const auto& [k, _] : ec.settings.items()) {
      if (accepted.count(k)) continue;
      std::string list;
      for (const auto& a : accepted) list += (list.empty() ? "" : ", ") + a;
      return Status::InvalidArgument(where(ec.key_lines.count(k) ? ec.key_lines.at(k) : ec.line) +
                                     path + "." + k + ": unknown key for plugin '" + ec.plugin +
                                     "' (accepted: name, plugin, description, keywords, examples, "
                                     "capacity, timeout" +
                                     (list.empty() ? "" : ", " + list) + ")");
    }
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
    char err[512] = {0};
    void* inst = lib->api->create(settings.c_str(), err, sizeof err);
    if (!inst) {
      std::string msg = err[0] ? err : "the plugin refused these settings";
      int line = ec.line;
      std::string key;
      if (size_t c = msg.find(':');
          c != std::string::npos && ec.key_lines.count(msg.substr(0, c))) {
        key = msg.substr(0, c);
        line = ec.key_lines.at(key);
        msg = msg.substr(c + 1);
        while (!msg.empty() && msg[0] == ' ') msg.erase(0, 1);
      }
      return Status::InvalidArgument(where(line) + path + (key.empty() ? "" : "." + key) + ": " +
                                     msg);
    }
    (*out)[ec.name] = std::make_shared<Expert>(lib, inst, std::move(man), ec.plugin, lib->file, fp);
  }
  return Status::OK();
}

Status ExpertRegistry::Configure(const Config& config) {
  std::lock_guard<std::mutex> l(mu_);
  std::map<std::string, std::shared_ptr<Expert>> trial;
  CORTEX_RETURN_IF_ERROR(BuildInstances(config.experts, config.source, &trial));
  instances_ = config.experts;
  instances_source_ = config.source;
  RebuildLocked();
  return Status::OK();
}

void ExpertRegistry::RebuildLocked() {
  std::map<std::string, std::shared_ptr<Expert>> next;
  std::set<std::string> configured;
  for (const auto& ec : instances_) configured.insert(ec.name);
  for (const auto& [name, lib] : plugins_) {
    if (lib->manifest.requires_config || configured.count(name)) continue;
    const std::string fp = fmt::format("{}|default", static_cast<const void*>(lib.get()));
    auto cur = active_.find(name);
    if (cur != active_.end() && cur->second->fingerprint() == fp) {
      next[name] = cur->second;
      continue;
    }
    char err[512] = {0};
    void* inst = lib->api->create("{}", err, sizeof err);
    if (!inst) {
      Audit(name, lib->file, "refused", std::string("default instance: ") + err);
      continue;
    }
    next[name] = std::make_shared<Expert>(lib, inst, lib->manifest, name, lib->file, fp);
  }
  // Configured instances one by one: one that no longer builds (its plugin vanished or
  // changed) is listed as removed without taking the others down.
  for (size_t i = 0; i < instances_.size(); ++i) {
    std::map<std::string, std::shared_ptr<Expert>> one;
    Status st = BuildInstances({instances_[i]}, instances_source_, &one);
    if (!st.ok()) {
      if (active_.count(instances_[i].name) || !removed_.count(instances_[i].name))
        Audit(instances_[i].name, "", "unavailable", st.message());
      ExpertInfo info;
      info.name = instances_[i].name;
      info.plugin = instances_[i].plugin;
      info.state = "removed";
      removed_[info.name] = info;
      continue;
    }
    next.insert(one.begin(), one.end());
  }
  bool changed = next.size() != active_.size();
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
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::shared_ptr<Expert>> out;
  for (const auto& [_, e] : active_) out.push_back(e);
  return out;
}

std::shared_ptr<Expert> ExpertRegistry::Find(const std::string& name) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = active_.find(name);
  return it == active_.end() ? nullptr : it->second;
}

std::vector<ExpertInfo> ExpertRegistry::List() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<ExpertInfo> out;
  for (const auto& [_, e] : active_) out.push_back(InfoOf(*e, "active"));
  for (const auto& [_, i] : removed_) out.push_back(i);
  return out;
}

}  // namespace cortex
