// libFuzzer target: the YAML config loader must answer any bytes with a config or a Status.
#include <cstddef>
#include <cstdint>
#include <string>

#include "cortex/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string yaml(reinterpret_cast<const char*>(data), size);
  auto c = cortex::LoadConfigString(yaml, "fuzz.yaml");
  if (!c.ok()) (void)c.status().message();
  return 0;
}
