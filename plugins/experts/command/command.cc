// The `command` expert: runs a configured program for each task. Never through a shell:
// argv is passed as configured; the task's text arrives on stdin and in CORTEX_TASK_TEXT.
// Exit 0 is success; a last stdout line {"quality": Q} sets the quality.
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>

#include "../common/expert_util.h"
#include "cortex/plugin_sdk.hpp"
#include "cortex/tags.h"

namespace {

using cortex::experts::ProcessResult;
using cortex::experts::ProcessSpec;

const char* const kKeywords[] = {nullptr};
const char* const kConfigKeys[] = {"run", "cwd", "env", nullptr};
const cortex_manifest kManifest = {
    "command",
    "1.0.0",
    "Runs a configured program with the task text on stdin; exit status decides the outcome.",
    kKeywords,
    nullptr,
    kConfigKeys,
    4,
    600000,
    CORTEX_MANIFEST_REQUIRES_CONFIG};

constexpr size_t kMaxEnvText = 64 << 10;

class CommandExpert {
 public:
  static CommandExpert* Create(const nlohmann::json& s, std::string* err) {
    auto e = std::make_unique<CommandExpert>();
    if (!s.contains("run")) {
      *err = "run: is required: the program and its arguments, e.g. [\"make\", \"test\"]";
      return nullptr;
    }
    const auto& run = s["run"];
    if (!run.is_array() || run.empty()) {
      *err = "run: expected a non-empty list of strings (program first)";
      return nullptr;
    }
    for (const auto& a : run) {
      if (!a.is_string()) {
        *err = "run: every element must be a string";
        return nullptr;
      }
      e->argv_.push_back(a.get<std::string>());
    }
    if (e->argv_[0].empty()) {
      *err = "run: the program name is empty";
      return nullptr;
    }
    if (s.contains("cwd")) {
      if (!s["cwd"].is_string()) {
        *err = "cwd: expected a string";
        return nullptr;
      }
      e->cwd_ = s["cwd"].get<std::string>();
    }
    if (s.contains("env")) {
      if (!s["env"].is_object()) {
        *err = "env: expected a mapping of NAME: value";
        return nullptr;
      }
      for (const auto& [k, v] : s["env"].items()) {
        if (!v.is_string() || k.empty() || k.find('=') != std::string::npos) {
          *err = "env: '" + k + "' must map a NAME without '=' to a string";
          return nullptr;
        }
        if (k.rfind("CORTEX_", 0) == 0) {  // the task's own (text, id, tags): not to be forged
          *err = "env: '" + k + "': CORTEX_* variables carry the task; choose another name";
          return nullptr;
        }
        e->extra_env_.push_back(k + "=" + v.get<std::string>());
      }
    }
    return e.release();
  }

  cortex_result Execute(const cortex_task& task, const cortex_host& host) {
    ProcessSpec spec;
    spec.argv = argv_;
    // Without `cwd` it runs in the task's repository (tag repo=, absolute, a folder), as a
    // build or test command expects; else where cortexd runs ("/" once detached).
    spec.cwd = cwd_;
    for (size_t i = 0; spec.cwd.empty() && i < task.n_tags; ++i) {
      struct stat st;
      const std::string v = task.tags[i].value;
      if (std::string(task.tags[i].key) == "repo" && !v.empty() && v[0] == '/' &&
          stat(v.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
        spec.cwd = v;
    }
    spec.stdin_data = task.text;
    spec.deadline_ms = task.deadline_unix_ms;
    spec.cancelled = [&host] { return host.cancelled(host.ctx) != 0; };
    // A clean environment: nothing of the daemon's leaks into the program.
    const char* path = std::getenv("PATH");
    const std::string text = task.text;
    spec.env = {std::string("PATH=") + (path ? path : "/usr/local/bin:/usr/bin:/bin"),
                "LANG=C.UTF-8", std::string("CORTEX_TASK_ID=") + task.id,
                "CORTEX_TASK_TEXT_BYTES=" + std::to_string(text.size())};
    // The kernel refuses a single variable over 128 KiB ("Argument list too long"): a
    // longer text reaches the program on stdin only.
    if (text.size() <= kMaxEnvText) spec.env.push_back("CORTEX_TASK_TEXT=" + text);
    if (const char* home = std::getenv("HOME")) spec.env.push_back(std::string("HOME=") + home);
    std::map<std::string, std::string> tag_vars;  // variable -> the tag that made it
    for (size_t i = 0; i < task.n_tags; ++i) {
      const std::string key = task.tags[i].key, var = "CORTEX_TAG_" + cortex::TagKeyName(key);
      auto [it, fresh] = tag_vars.emplace(var, key);
      if (!fresh)
        return Fail(CORTEX_OUTCOME_REJECTED, "tags '" + it->second + "' and '" + key +
                                                 "' would both be " + var + "; rename one of them");
      spec.env.push_back(var + "=" + task.tags[i].value);
    }
    // An `env` entry replaces a variable of the same name (a program reads the first).
    for (const std::string& kv : extra_env_) {
      const std::string name = kv.substr(0, kv.find('=') + 1);
      spec.env.erase(std::remove_if(spec.env.begin(), spec.env.end(),
                                    [&](const std::string& v) { return v.rfind(name, 0) == 0; }),
                     spec.env.end());
      spec.env.push_back(kv);
    }

    ProcessResult r = cortex::experts::RunProcess(spec);
    cortex::sdk::Write(host, r.out);
    if (!r.err.empty())
      cortex::sdk::Write(host, (r.out.empty() ? "" : "\n") + std::string("[stderr]\n") + r.err);
    if (!r.started) return Fail(CORTEX_OUTCOME_FAILURE, r.error);
    if (r.timed_out) return Fail(CORTEX_OUTCOME_TIMEOUT, "killed at its deadline");
    if (r.cancelled) return Fail(CORTEX_OUTCOME_TIMEOUT, "stopped: the host cancelled the task");
    if (r.signal)
      return Fail(CORTEX_OUTCOME_CRASH, "killed by " + cortex::experts::SignalName(r.signal));
    double quality = LastLineQuality(r.out);
    if (r.exit_code != 0)
      return Fail(CORTEX_OUTCOME_FAILURE, "exit status " + std::to_string(r.exit_code), quality);
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, quality);
  }

 private:
  // Errors are returned through a thread-local buffer: valid until the next call on
  // this thread, which is long enough for the host to copy it.
  static cortex_result Fail(cortex_outcome_kind kind, const std::string& msg, double q = -1) {
    thread_local std::string buf;
    buf = msg;
    return cortex::sdk::Result(kind, q, buf.c_str());
  }

  static double LastLineQuality(const std::string& out) {
    size_t end = out.find_last_not_of(" \t\r\n");
    if (end == std::string::npos) return -1;
    size_t start = out.rfind('\n', end);
    start = start == std::string::npos ? 0 : start + 1;
    auto j = nlohmann::json::parse(out.substr(start, end - start + 1), nullptr, false);
    if (!j.is_object() || !j.contains("quality") || !j["quality"].is_number()) return -1;
    double q = j["quality"].get<double>();
    return std::isfinite(q) ? std::clamp(q, 0.0, 1.0) : -1;
  }

  std::vector<std::string> argv_;
  std::string cwd_;
  std::vector<std::string> extra_env_;
};

}  // namespace

CORTEX_EXPORT_PLUGIN(CommandExpert, &kManifest)
