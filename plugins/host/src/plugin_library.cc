#define BOOST_DLL_USE_STD_FS
#include "plugin_library.h"

#include <dlfcn.h>

#include <cmath>
#include <cstring>

namespace cortex {

namespace {

// Plugin-supplied strings are read with bounds: 256 entries of up to 4 KiB each.
std::string CStr(const char* s) { return s ? std::string(s, strnlen(s, 4096)) : std::string(); }
std::vector<std::string> CStrList(const char* const* list) {
  std::vector<std::string> out;
  for (; list && *list && out.size() < 256; ++list) out.push_back(CStr(*list));
  return out;
}

}  // namespace

Status ValidateManifest(const Manifest& m) {
  if (!ValidExpertName(m.name))
    return Status::FailedPrecondition("manifest name '" + m.name +
                                      "' is not 1-64 characters of a-z, 0-9, '-', '_', '.'");
  if (m.version.empty()) return Status::FailedPrecondition("manifest has no version");
  if (m.capacity < 1 || m.capacity > 1024)
    return Status::FailedPrecondition("manifest capacity must be 1..1024");
  if (!(m.timeout_s > 0) || m.timeout_s > 1e7)
    return Status::FailedPrecondition("manifest timeout must be positive");
  return Status::OK();
}

Status ManifestFromC(const cortex_manifest* m, Manifest* out) {
  Manifest man;
  man.name = CStr(m->name);
  man.version = CStr(m->version);
  man.description = CStr(m->description);
  man.keywords = CStrList(m->keywords);
  man.examples = CStrList(m->examples);
  man.config_keys = CStrList(m->config_keys);
  man.capacity = m->capacity > 1024 ? 0 : static_cast<int>(m->capacity);
  man.timeout_s = m->timeout_ms ? m->timeout_ms / 1000.0 : 60.0;
  man.requires_config = (m->flags & CORTEX_MANIFEST_REQUIRES_CONFIG) != 0;
  CORTEX_RETURN_IF_ERROR(ValidateManifest(man));
  *out = std::move(man);
  return Status::OK();
}

Status PluginLibrary::Open(const std::string& load_path, const std::string& display_path,
                           std::unique_ptr<PluginLibrary>* out) {
  auto lib = std::unique_ptr<PluginLibrary>(new PluginLibrary());
  std::error_code ec;
  lib->lib_.load(load_path, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local,
                 ec);
  if (ec) {
    const char* dlerr = ::dlerror();
    std::string why = dlerr ? dlerr : ec.message();
    if (size_t p = why.find(load_path); p != std::string::npos)
      why.replace(p, load_path.size(), display_path);
    return Status::FailedPrecondition("cannot load shared library: " + why);
  }
  if (!lib->lib_.has(CORTEX_PLUGIN_ENTRY_NAME))
    return Status::FailedPrecondition(std::string("not a Cortex plugin: no ") +
                                      CORTEX_PLUGIN_ENTRY_NAME + " entry point");
  auto entry = lib->lib_.get<const cortex_plugin_api*()>(CORTEX_PLUGIN_ENTRY_NAME);
  const cortex_plugin_api* api = entry();
  if (!api) return Status::FailedPrecondition("the plugin's entry point returned no API table");
  if (api->abi_version != CORTEX_PLUGIN_ABI_VERSION)
    return Status::FailedPrecondition(
        "built for plugin ABI v" + std::to_string(api->abi_version) + ", this cortexd speaks v" +
        std::to_string(CORTEX_PLUGIN_ABI_VERSION) + "; rebuild it against this SDK");
  if (api->struct_size < sizeof(cortex_plugin_api) || !api->manifest || !api->create ||
      !api->destroy || !api->execute)
    return Status::FailedPrecondition("incomplete API table (missing manifest or functions)");
  CORTEX_RETURN_IF_ERROR(ManifestFromC(api->manifest, &lib->manifest_));
  lib->api_ = api;
  *out = std::move(lib);
  return Status::OK();
}

// ---------------------------------------------------------------------------------------
// Execution

Execution::Execution(const Task& task, int64_t deadline_unix_ms) : id_(task.id), text_(task.text) {
  for (const auto& [k, v] : task.tags) {
    keys_.push_back(k);
    values_.push_back(v);
  }
  for (size_t i = 0; i < keys_.size(); ++i) tags_.push_back({keys_[i].c_str(), values_[i].c_str()});
  task_ = {id_.c_str(), text_.c_str(), tags_.data(), tags_.size(), deadline_unix_ms};
  host_ = {this, &CancelledCb, &WriteCb};
}

int Execution::CancelledCb(void* ctx) { return static_cast<Execution*>(ctx)->cancelled_.load(); }

void Execution::WriteCb(void* ctx, const char* data, size_t len) {
  auto* s = static_cast<Execution*>(ctx);
  if (!data || !len) return;
  std::lock_guard<std::mutex> l(s->mu_);
  size_t room = kMaxExpertOutputBytes - std::min(kMaxExpertOutputBytes, s->output_.size());
  if (len > room) s->truncated_ = true;
  s->output_.append(data, std::min(len, room));
}

void Execution::Run(const cortex_plugin_api* api, void* instance) {
  cortex_result r = api->execute(instance, &task_, &host_);
  Outcome& o = outcome_;
  switch (r.kind) {
    case CORTEX_OUTCOME_SUCCESS:
      o.kind = OutcomeKind::kSuccess;
      break;
    case CORTEX_OUTCOME_FAILURE:
      o.kind = OutcomeKind::kFailure;
      break;
    case CORTEX_OUTCOME_TIMEOUT:
      o.kind = OutcomeKind::kTimeout;
      break;
    case CORTEX_OUTCOME_CRASH:
      o.kind = OutcomeKind::kCrash;
      break;
    case CORTEX_OUTCOME_REJECTED:
      o.kind = OutcomeKind::kRejected;
      break;
    default:
      o.kind = OutcomeKind::kFailure;
      o.error = "the expert returned an unknown outcome kind " + std::to_string(r.kind);
  }
  if (r.error && o.error.empty()) o.error = std::string(r.error, strnlen(r.error, 1024));
  const double q = r.quality;
  const bool ok = o.kind == OutcomeKind::kSuccess;
  o.quality = (std::isnan(q) || q < 0) ? (ok ? 1.0 : 0.0) : std::min(1.0, q);
}

Outcome Execution::TakeOutcome() {
  std::lock_guard<std::mutex> l(mu_);
  Outcome o = std::move(outcome_);
  o.output = output_;
  if (truncated_) o.output += "\n[output truncated]";
  return o;
}

}  // namespace cortex
