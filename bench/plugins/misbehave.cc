// A misbehaving expert for the soak benchmark and the isolation tests. Its `mode`
// setting (or a phrase in the task text) picks what it does to its host process:
//   crash ("please segfault")   dereferences a null pointer
//   abort ("please abort")      calls abort()
//   hang  ("please hang hard")  sleeps and ignores cancellation
//   oom   ("please eat memory") allocates (and touches) up to `memory_mb` MiB
//   slow  ("please be slow")    sleeps `delay_ms`, then succeeds; with `started_file`
//                               set, creates that file first (tests wait for it)
//   fork  ("please fork then segfault")  forks a child that sleeps for 5 minutes (its
//                               pid written to `started_file`), then segfaults
//   ok                          succeeds at once
// `rate` (0..1) is the share of tasks that misbehave (by a hash of the task id); the
// rest succeed. Built with -DMISBEHAVE_ON_LOAD, its entry point itself segfaults.
#include <chrono>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "cortex/plugin_sdk.hpp"

namespace {

// A real invalid write, hidden from the sanitizers' null checks so that it ends in
// SIGSEGV in every build (UBSan would otherwise stop the process first, with exit 1).
__attribute__((noinline, no_sanitize("undefined", "address"))) void Segfault() {
  volatile int* volatile p = nullptr;
  *p = 1;
}

const char* const kKeywords[] = {"misbehave", "crash", "hang", "memory", nullptr};
const char* const kExamples[] = {"please segfault", nullptr};
const char* const kKeys[] = {"mode", "rate", "delay_ms", "memory_mb", "started_file", nullptr};
const cortex_manifest kManifest = {
    "misbehave", "1.0.0",   "Misbehaves on purpose (soak benchmark and tests).",
    kKeywords,   kExamples, kKeys,
    4,           5000,      0};

// Config scalars arrive as strings (YAML does not say which are numbers).
double Num(const nlohmann::json& s, const char* key, double dflt) {
  if (!s.contains(key)) return dflt;
  if (s[key].is_number()) return s[key].get<double>();
  return s[key].is_string() ? std::atof(s[key].get<std::string>().c_str()) : dflt;
}

class Misbehave {
 public:
  static Misbehave* Create(const nlohmann::json& s, std::string* err) {
    auto m = std::make_unique<Misbehave>();
    m->mode_ = s.value("mode", "ok");
    if (m->mode_ != "ok" && m->mode_ != "crash" && m->mode_ != "abort" && m->mode_ != "hang" &&
        m->mode_ != "oom" && m->mode_ != "slow") {
      *err = "mode: expected ok, crash, abort, hang, oom or slow";
      return nullptr;
    }
    m->rate_ = Num(s, "rate", 1.0);
    m->delay_ms_ = static_cast<long>(Num(s, "delay_ms", 50));
    m->memory_mb_ = static_cast<long>(Num(s, "memory_mb", 2048));
    m->started_file_ = s.value("started_file", "");
    return m.release();
  }

  cortex_result Execute(const cortex_task& task, const cortex_host& host) {
    const std::string text = task.text;
    std::string mode = "ok";
    if (text.find("please segfault") != std::string::npos)
      mode = "crash";
    else if (text.find("please fork then segfault") != std::string::npos)
      mode = "fork";
    else if (text.find("please abort") != std::string::npos)
      mode = "abort";
    else if (text.find("please hang hard") != std::string::npos)
      mode = "hang";
    else if (text.find("please eat memory") != std::string::npos)
      mode = "oom";
    else if (text.find("please be slow") != std::string::npos)
      mode = "slow";
    else if ((std::hash<std::string>{}(task.id) % 1000) < rate_ * 1000)
      mode = mode_;
    if (mode == "fork") {
      pid_t child = fork();
      if (child == 0) {
        setpgid(0, 0);  // a group of its own, as a program that manages jobs would do
        sleep(300);
        _exit(0);
      }
      if (!started_file_.empty())
        if (FILE* f = std::fopen(started_file_.c_str(), "w")) {
          std::fprintf(f, "%d\n", static_cast<int>(child));
          std::fclose(f);
        }
      Segfault();
    }
    if (mode == "crash") Segfault();
    if (mode == "abort") std::abort();
    if (mode == "hang")
      while (true) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (mode == "oom") {
      std::vector<std::unique_ptr<char[]>> hog;
      for (long mb = 0; mb < memory_mb_; mb += 16) {
        hog.emplace_back(new char[16 << 20]);
        std::memset(hog.back().get(), 1, 16 << 20);
      }
      cortex::sdk::Write(host, "allocated " + std::to_string(memory_mb_) + " MiB: no limit hit");
      return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 0.5);
    }
    if (mode == "slow") {
      if (!started_file_.empty())
        if (FILE* f = std::fopen(started_file_.c_str(), "w")) std::fclose(f);
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
    }
    cortex::sdk::Write(host, "done: " + text);
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 0.9);
  }

 private:
  std::string mode_;
  double rate_ = 1;
  long delay_ms_ = 50;
  long memory_mb_ = 2048;
  std::string started_file_;
};
}  // namespace

#ifdef MISBEHAVE_ON_LOAD
extern "C" CORTEX_PLUGIN_EXPORT const cortex_plugin_api* cortex_plugin_entry(void) {
  Segfault();
  return nullptr;
}
#else
CORTEX_EXPORT_PLUGIN(Misbehave, &kManifest)
#endif
