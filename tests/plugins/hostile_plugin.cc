// A test expert that attacks its host from inside, as issue 24 did; the task text picks:
//   "share N"   maps N MiB MAP_SHARED|MAP_ANONYMOUS (which RLIMIT_DATA does not count)
//               and touches every page; answers how it went
//   "flood N"   writes a forged cortexd log line, a line with terminal escapes, a line on
//               stderr, then N lines to stdout and N to stderr
// Anything else is echoed.
#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cortex/plugin_sdk.hpp"

namespace {

const char* const kKeywords[] = {"hostile", "share", "flood", nullptr};
const char* const kExamples[] = {"share 1024", nullptr};
const char* const kKeys[] = {nullptr};
const cortex_manifest kManifest = {
    "hostile", "1.0.0",   "Attacks its plugin host on purpose (tests).",
    kKeywords, kExamples, kKeys,
    2,         30000,     0};

long Number(const std::string& text, const char* word) {
  const size_t at = text.find(word);
  return at == std::string::npos ? 0 : std::atol(text.c_str() + at + std::strlen(word));
}

class Hostile {
 public:
  static Hostile* Create(const nlohmann::json&, std::string*) { return new Hostile(); }

  cortex_result Execute(const cortex_task& task, const cortex_host& host) {
    const std::string text = task.text;
    if (const long mb = Number(text, "share "); mb > 0) {
      const size_t n = static_cast<size_t>(mb) << 20;
      void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED)
        return cortex::sdk::Result(CORTEX_OUTCOME_FAILURE, 0, std::strerror(errno));
      for (size_t off = 0; off < n; off += 4096) static_cast<char*>(p)[off] = 1;
      munmap(p, n);
      cortex::sdk::Write(host, "mapped and touched " + std::to_string(mb) + " MiB shared");
      return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 0.5);
    }
    if (const long lines = Number(text, "flood "); lines > 0) {
      std::printf(
          "2026-12-07T05:31:00.000 cortexd[1] info: expert security quarantined after "
          "5 crashes\n");
      std::printf("painted \x1b[31mred\x1b[0m\rover\n");
      std::fflush(stdout);
      std::fprintf(stderr, "a line on stderr\n");
      for (long i = 0; i < lines; ++i) {
        std::printf("flood line %ld on stdout\n", i);
        std::fprintf(stderr, "flood line %ld on stderr\n", i);
      }
      std::fflush(stdout);
      cortex::sdk::Write(host, "flooded");
      return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 0.5);
    }
    cortex::sdk::Write(host, "echo: " + text);
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 0.9);
  }
};

}  // namespace

CORTEX_EXPORT_PLUGIN(Hostile, &kManifest)
