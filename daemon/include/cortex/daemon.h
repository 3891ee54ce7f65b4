// cortexd: accepts tasks on a Unix socket, stores them before acknowledging, routes
// whatever is queued in batches, runs each on its chosen expert with fallback, and
// answers audit queries. One Daemon per process.
#pragma once

#include <memory>
#include <string>

#include "cortex/config.h"
#include "cortex/status.h"

namespace cortex {

struct DaemonOptions {
  std::string config_path;         // empty: embedded defaults (reload re-reads the same)
  std::string bundled_plugin_dir;  // empty: next to the executable (../lib/cortex/plugins)
  std::string plugin_host;         // empty: ../lib/cortex/cortex-plugin-host beside it
};

class Daemon {
 public:
  static Result<std::unique_ptr<Daemon>> Create(Config config, DaemonOptions options);
  virtual ~Daemon() = default;
  // Opens the store, takes the lock, loads plugins, recovers unfinished tasks and starts
  // listening. After OK the socket accepts connections.
  virtual Status Start() = 0;
  // Serves until SIGTERM/SIGINT (or RequestStop), then stops gracefully. SIGHUP reloads.
  virtual Status Run() = 0;
  virtual void RequestStop() = 0;
};

// The bundled plugin folder for the running executable, or "" if there is none.
std::string BundledPluginDir();
// The plugin host executable installed with the running executable, or "".
std::string BundledPluginHost();

}  // namespace cortex
