// The YAML configuration: its schema, the embedded defaults and a strict loader.
// Every error names the file, the line and the key; unknown keys are errors.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cortex/status.h"

namespace cortex {

struct DaemonConfig {
  std::string socket;  // empty: $XDG_RUNTIME_DIR/cortex/cortexd.sock
  int workers = 4;
  int max_connections = 64;
  size_t max_request_bytes = 1 << 20;
  size_t max_text_bytes = 16 << 10;
  int max_tags = 32;
  double shutdown_grace_s = 10;
  double idle_timeout_s = 30;  // a connection silent this long is closed (0: never)
  size_t max_queued = 100000;  // tasks waiting to run; a submit beyond is refused
  // Besides the daemon's own user (and root), members of this group may use the socket.
  std::string allow_group;
  // A cluster (store.url): this node's name (empty: the host name and a hash of the
  // socket's path), and how long a node may miss its heartbeats before it is lost.
  std::string node;
  double node_timeout_s = 5;
};

struct StoreConfig {
  std::string path;  // empty: $XDG_DATA_HOME/cortex/cortex.db (unless url is set)
  std::string url;   // a postgresql:// URI: the PostgreSQL store instead of the SQLite file
  // What OpenStore takes: the URI when set, else the file's path.
  const std::string& Location() const { return url.empty() ? path : url; }
};

struct PluginsConfig {
  std::string dir;      // empty: $XDG_DATA_HOME/cortex/plugins
  bool watch = true;    // inotify: changes take effect without a restart
  bool bundled = true;  // also load the experts shipped with cortexd
  // process: each instance in a supervised cortex-plugin-host; in-process: on cortexd's
  // threads (trusted plugins only: a crash in one takes cortexd down).
  std::string isolation = "process";
  size_t memory_limit = 1ull << 30;  // per plugin host, shared memory too; 0: none
  int quarantine_after = 5;          // consecutive crashes
  double restart_backoff_s = 0.25;   // doubles with each consecutive crash, up to 30s
  double load_timeout_s = 10;        // a plugin's load or create() that takes longer is refused
  // The only variables of cortexd's environment a plugin host (and so a plugin) sees.
  std::vector<std::string> env = {"PATH", "HOME",   "USER", "LOGNAME",
                                  "LANG", "LC_ALL", "TZ",   "TMPDIR"};
};

struct RouterConfig {
  std::string backend = "auto";  // auto | cpu | cuda
  double exploration = 0.05;
  double load_bias = 0.2;
  double health_bias = 0.5;  // how strongly a crashing or restarting expert is passed over
  int max_attempts = 2;
  uint64_t seed = 0;  // 0: seeded from the clock
};

struct MetricsConfig {
  // "HOST:PORT" on a loopback address (127.0.0.0/8, [::1], localhost) where /metrics is
  // served in Prometheus text format; empty: off. Port 0 takes any free port (status says
  // which).
  std::string listen;
};

struct TrainingConfig {
  double interval_s = 600;
  int min_new_outcomes = 200;
  bool online = true;            // learn from each outcome between retrains
  int epochs = 4;                // passes over the history per retrain, at most
  int population = 1;            // candidates each retrain fits, the best kept (1-4)
  int feedback_per_hour = 60;    // verdicts one person may give in an hour
  int keep_versions = 20;        // refused versions kept (live and promoted ones always are)
  long checkpoint_every = 3000;  // online steps between checkpoints of the live weights
};

struct RuleConfig {
  std::string name;
  std::vector<std::string> match;  // case-insensitive substrings, or /regex/
  std::string expert;
  double boost = 0;
  bool force = false;
  int line = 0;
  std::vector<int> match_lines;  // each pattern's line, for errors that name one
  bool builtin = false;          // from the embedded defaults, not the user's file
};

// One instance of a (possibly configurable) plugin.
struct ExpertConfig {
  std::string name;
  std::string plugin;
  std::optional<std::string> description;
  std::optional<std::vector<std::string>> keywords;
  std::optional<std::vector<std::string>> examples;
  std::optional<int> capacity;
  std::optional<double> timeout_s;
  nlohmann::json settings = nlohmann::json::object();  // plugin-specific keys
  std::map<std::string, int> key_lines;                // settings key -> line
  int line = 0;
  int index = 0;  // its place in the file's experts: list (experts[index] in errors)
};

struct Config {
  std::string source = "<embedded defaults>";  // file name used in error messages
  DaemonConfig daemon;
  StoreConfig store;
  PluginsConfig plugins;
  RouterConfig router;
  TrainingConfig training;
  MetricsConfig metrics;
  std::vector<RuleConfig> rules;
  std::vector<ExpertConfig> experts;

  // "file:line" for messages about something defined at `line`.
  std::string Where(int line) const;
};

// Splits metrics.listen into a host and port, refusing what is not a loopback address.
Status ParseMetricsListen(const std::string& listen, std::string* host, int* port);

// The YAML text of the embedded defaults (also what `cortexd --print-config` shows).
const char* EmbeddedDefaultsYaml();

// A user's config file: its rules add to the built-in ones; empty paths get defaults;
// relative paths (and an expert's `cwd`) are relative to the file's folder.
Result<Config> LoadConfigFile(const std::string& path);
// For --check-config: the same, but errors in the file's contents go to *errors, a line
// each, and what did parse is returned so the later checks still run on it (an expert or
// rule with an error is left out). Fails only when the file cannot be read or is no YAML.
Result<Config> LoadConfigFileForCheck(const std::string& path, std::vector<std::string>* errors);
Result<Config> LoadConfigString(const std::string& yaml, const std::string& source_name);
// The configuration as YAML that loads back to the same: what `--print-config` shows.
std::string ConfigToYaml(const Config& config);
// The embedded defaults, with empty paths resolved from the environment.
Config DefaultConfig();

// Every scalar setting's dotted key ("daemon.workers", ...), from the schema the parser
// checks against; and a config's value for each of them, as text, to compare configs
// (rules and experts are lists, compared by whoever applies them).
std::vector<std::string> SettingKeys();
std::map<std::string, std::string> SettingsOf(const Config& c);

// Fills empty socket/store/plugin paths with the XDG defaults.
void ResolveDefaultPaths(Config* config);

// An expert's name, from a manifest or the config: 1-64 characters of a-z, 0-9, - _ .
bool ValidExpertName(const std::string& name);

// "10m", "30s", "1h", "250ms", "2d" or a plain number of seconds.
Result<double> ParseDuration(const std::string& text);
// "512MiB", "1GiB", "64KiB", "1G", "1000000" (bytes) or "0".
Result<size_t> ParseSize(const std::string& text);

}  // namespace cortex
