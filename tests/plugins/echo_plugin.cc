// A test expert whose behaviour the task text selects: "please fail", "please reject",
// "please hang" (until cancelled), otherwise it echoes. Built in several variants
// (name, version, ABI) to exercise the loader.
#include <chrono>
#include <string>
#include <thread>

#include "cortex/plugin_sdk.hpp"

#ifndef ECHO_NAME
#define ECHO_NAME "echo"
#endif
#ifndef ECHO_VERSION
#define ECHO_VERSION "1.0.0"
#endif
#ifdef TEST_ABI
#undef CORTEX_PLUGIN_ABI_VERSION
#define CORTEX_PLUGIN_ABI_VERSION TEST_ABI
#endif

namespace {
#ifdef ECHO_HANG_ON_LOAD
// Runs when the library is loaded, before any entry point: cortexd must not wait on it.
__attribute__((constructor)) void HangWhileLoading() {
  std::this_thread::sleep_for(std::chrono::seconds(60));
}
#endif

const char* const kKeywords[] = {"echo", "repeat", "parrot", nullptr};
const char* const kExamples[] = {"echo this back to me", nullptr};
const char* const kKeys[] = {"prefix", nullptr};
const cortex_manifest kManifest = {
    ECHO_NAME, ECHO_VERSION, "Echoes the task text back (test expert).",
    kKeywords, kExamples,    kKeys,
    2,         5000,         0};

class Echo {
 public:
  static Echo* Create(const nlohmann::json& s, std::string* err) {
    auto* e = new Echo();
    if (s.contains("prefix")) {
      if (!s["prefix"].is_string()) {
        *err = "prefix: expected a string";
        delete e;
        return nullptr;
      }
      e->prefix_ = s["prefix"].get<std::string>();
    }
    return e;
  }
  cortex_result Execute(const cortex_task& task, const cortex_host& host) {
    std::string text = task.text;
    if (text.find("please hang") != std::string::npos) {
      for (int i = 0; i < 1000 && !host.cancelled(host.ctx); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return cortex::sdk::Result(CORTEX_OUTCOME_TIMEOUT, 0, "cancelled");
    }
    if (text.find("please fail") != std::string::npos)
      return cortex::sdk::Result(CORTEX_OUTCOME_FAILURE, 0, "asked to fail");
    if (text.find("please reject") != std::string::npos)
      return cortex::sdk::Result(CORTEX_OUTCOME_REJECTED, 0, "asked to reject");
    cortex::sdk::Write(host, prefix_ + std::string(ECHO_VERSION) + ": " + text);
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 0.75);
  }

 private:
  std::string prefix_ = "echo ";
};
}  // namespace

CORTEX_EXPORT_PLUGIN(Echo, &kManifest)
