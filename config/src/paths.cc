#include "cortex/paths.h"

#include <pwd.h>
#include <unistd.h>

#include <cstdlib>

namespace cortex {
namespace {
std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : "";
}
std::string Home() {
  std::string h = Env("HOME");
  if (!h.empty()) return h;
  if (struct passwd* pw = getpwuid(getuid())) return pw->pw_dir;
  return "/tmp";
}
}  // namespace

std::string DataDir() {
  std::string x = Env("XDG_DATA_HOME");
  return (x.empty() ? Home() + "/.local/share" : x) + "/cortex";
}

std::string RuntimeDir() {
  std::string x = Env("XDG_RUNTIME_DIR");
  if (!x.empty()) return x + "/cortex";
  return "/tmp/cortex-" + std::to_string(getuid());
}

std::string DefaultSocketPath() {
  std::string s = Env("CORTEX_SOCKET");
  return s.empty() ? RuntimeDir() + "/cortexd.sock" : s;
}
std::string DefaultStorePath() { return DataDir() + "/cortex.db"; }
std::string DefaultPluginDir() { return DataDir() + "/plugins"; }

std::string DefaultConfigFile() {
  std::string x = Env("XDG_CONFIG_HOME");
  for (const std::string& f : {(x.empty() ? Home() + "/.config" : x) + "/cortex/cortex.yaml",
                               std::string("/etc/cortex/cortex.yaml")})
    if (access(f.c_str(), F_OK) == 0) return f;
  return "";
}

const char* CortexVersion() { return CORTEX_VERSION; }

}  // namespace cortex
