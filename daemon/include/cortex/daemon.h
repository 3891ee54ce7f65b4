// cortexd: accepts tasks on a Unix socket, stores them before acknowledging, routes
// whatever is queued in batches, runs each on its chosen expert with fallback, and
// answers audit queries. One Daemon per process.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cortex/config.h"
#include "cortex/env.h"
#include "cortex/status.h"

namespace cortex {

struct DaemonOptions {
  std::string config_path;         // empty: embedded defaults (reload re-reads the same)
  std::string bundled_plugin_dir;  // empty: next to the executable (../lib/cortex/plugins)
  std::string plugin_host;         // empty: ../lib/cortex/cortex-plugin-host beside it
  Env* env = Env::Default();       // clock and files, for the daemon and its experts
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

// What `cortexd --check-config` runs: every check of a start that neither opens the store
// nor listens (the config, every rule, the routing backend, the store and socket folders,
// every plugin loaded and every configured expert created in its host, as a start does).
// Every error is reported, a line each; what a start only warns about (a plugin file
// refused, a rule naming an expert that is not loaded) goes to *warnings.
Status CheckConfig(const Config& config, const DaemonOptions& options,
                   std::vector<std::string>* warnings);

// CheckConfig on the file at `path` ("" for the embedded defaults), with the file's own
// errors too (it goes on past them), every error a line, in the file's line order.
Status CheckConfigFile(const std::string& path, const DaemonOptions& options,
                       std::vector<std::string>* warnings);

// Fills in each configured expert's settings that the file leaves to its plugin
// (description, keywords, examples, capacity, timeout), from the manifest its plugin
// gives when created as a start would create it: what --print-config shows.
Status FillExpertDefaults(const DaemonOptions& options, Config* config);

// A start or reload stops at its first failing step; when that was a config error
// (InvalidArgument), this runs CheckConfigFile so the user sees every error at once, as
// --check-config would show them. Any other status is returned as it is.
Status EveryConfigError(const Status& first, const std::string& path, const DaemonOptions& options);

// The bundled plugin folder for the running executable, or "" if there is none.
std::string BundledPluginDir();
// The plugin host executable installed with the running executable, or "".
std::string BundledPluginHost();

}  // namespace cortex
