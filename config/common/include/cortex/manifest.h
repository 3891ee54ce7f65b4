// What an expert says of itself: its plugin's manifest (plugins/sdk/include/cortex/plugin.h),
// validated and copied out by the registry; the router scores it, the daemon shows it.
#pragma once

#include <string>
#include <vector>

namespace cortex {

struct Manifest {
  std::string name;
  std::string version;
  std::string description;
  std::vector<std::string> keywords;
  std::vector<std::string> examples;
  std::vector<std::string> config_keys;
  int capacity = 1;
  double timeout_s = 60;
  bool requires_config = false;
};

}  // namespace cortex
