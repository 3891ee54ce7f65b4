// libFuzzer target: a plugin's manifest, built from arbitrary bytes (NUL-separated
// strings, odd capacities and flags), is validated or refused, never trusted blindly;
// and the same bytes as a stream from a plugin host (frames, hello manifest, outcomes),
// which cortexd reads as hostile input.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cortex/experts.h"
#include "cortex/plugin.h"
#include "host_protocol.h"

namespace {
void HostStream(const uint8_t* data, size_t size) {
  cortex::hostproto::FrameReader reader;
  std::vector<nlohmann::json> frames;
  // Split in two so frames that straddle reads are exercised.
  const size_t half = size / 2;
  (void)reader.Feed(reinterpret_cast<const char*>(data), half, &frames);
  (void)reader.Feed(reinterpret_cast<const char*>(data) + half, size - half, &frames);
  // Whole inputs as one JSON body too, so the decoders see well-formed frames often.
  auto whole = nlohmann::json::parse(data, data + size, nullptr, false);
  if (whole.is_object()) frames.push_back(whole);
  for (const auto& f : frames) {
    cortex::Manifest m;
    (void)cortex::hostproto::ManifestFromJson(f.value("manifest", f), &m);
    cortex::Outcome o;
    (void)cortex::hostproto::OutcomeFromJson(f.value("outcome", f), &o);
    cortex::Task t;
    int64_t deadline = 0;
    (void)cortex::hostproto::TaskFromJson(f.value("task", f), &t, &deadline);
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  HostStream(data, size);
  if (size < 12) return 0;
  cortex_manifest m{};
  std::memcpy(&m.capacity, data, 4);
  std::memcpy(&m.timeout_ms, data + 4, 4);
  std::memcpy(&m.flags, data + 8, 4);
  std::vector<std::string> parts;
  std::string cur;
  for (size_t i = 12; i < size; ++i) {
    if (data[i] == 0) {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(data[i]));
    }
  }
  parts.push_back(cur);
  auto at = [&](size_t i) { return i < parts.size() ? parts[i].c_str() : nullptr; };
  m.name = at(0);
  m.version = at(1);
  m.description = at(2);
  std::vector<const char*> keywords, examples;
  for (size_t i = 3; i < parts.size(); ++i) (i % 2 ? keywords : examples).push_back(at(i));
  keywords.push_back(nullptr);
  examples.push_back(nullptr);
  m.keywords = keywords.data();
  m.examples = examples.data();
  cortex::Manifest out;
  (void)cortex::ManifestFromC(&m, &out);
  return 0;
}
