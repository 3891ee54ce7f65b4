// libFuzzer target: a plugin's manifest, built from arbitrary bytes (NUL-separated
// strings, odd capacities and flags), is validated or refused, never trusted blindly.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cortex/experts.h"
#include "cortex/plugin.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
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
