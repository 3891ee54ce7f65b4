#include "cortex/config.h"

#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "cortex/paths.h"
#include "cortex/store_url.h"

namespace cortex {
namespace {

const char kDefaults[] = R"(# cortexd embedded defaults: bundled experts, XDG paths, rules for them.
daemon:
  workers: 4
plugins:
  watch: true
  bundled: true
  isolation: process      # each expert in a supervised host process
  memory_limit: 1GiB      # per host
  quarantine_after: 5     # consecutive crashes
  restart_backoff: 250ms  # doubling per consecutive crash, at most 30s
  env: [PATH, HOME, USER, LOGNAME, LANG, LC_ALL, TZ, TMPDIR]  # all a plugin sees of ours
  load_timeout: 10s       # a load or create() that takes longer is refused
router:
  backend: auto
  exploration: 0.05
  load_bias: 0.2
  health_bias: 0.5
  max_attempts: 2
training:
  interval: 10m
  min_new_outcomes: 200
  online: true
  epochs: 4
  population: 1
  feedback_per_hour: 60
  keep_versions: 20
  checkpoint_every: 3000
rules:
  - name: security-terms
    match: ["cve", "vulnerab", "xss", "injection", "secret", "credential", "private key",
            "/\\bcsrf\\b/", "/\\btokens?\\b/", "permission"]
    expert: security
    boost: 0.3
  - name: inventory-terms
    match: ["inventory", "catalog", "/\\blanguages?\\b/", "dependenc", "manifest"]
    expert: inventory
    boost: 0.2
)";

// Every scalar setting of every section: the one list the parser accepts and reload diffs.
const std::map<std::string, std::set<std::string>>& Sections() {
  static const std::map<std::string, std::set<std::string>> k = {
      {"daemon",
       {"socket", "workers", "max_connections", "max_request_bytes", "max_text_bytes", "max_tags",
        "shutdown_grace", "allow_group", "idle_timeout", "max_queued", "node", "node_timeout"}},
      {"store", {"path", "url"}},
      {"metrics", {"listen"}},
      {"plugins",
       {"dir", "watch", "bundled", "isolation", "memory_limit", "quarantine_after",
        "restart_backoff", "env", "load_timeout"}},
      {"router", {"backend", "exploration", "load_bias", "health_bias", "max_attempts", "seed"}},
      {"training",
       {"interval", "min_new_outcomes", "online", "epochs", "population", "feedback_per_hour",
        "keep_versions", "checkpoint_every"}},
  };
  return k;
}

// Walks a YAML document with the file name at hand, so each error says where it is.
class Parser {
 public:
  explicit Parser(std::string source) : source_(std::move(source)) {}

  // Every error is kept and parsing goes on, so one run reports them all (the value in
  // error keeps its default).
  void Keep(const Status& st) const {
    if (!st.ok()) errors_.push_back(st.message());
  }
  const std::vector<std::string>& errors() const { return errors_; }

  Status Error(const YAML::Node& node, const std::string& key, const std::string& msg) const {
    return Status::InvalidArgument(source_ + ":" + std::to_string(Line(node)) + ": " + key + ": " +
                                   msg);
  }
  static int Line(const YAML::Node& n) { return n.Mark().line >= 0 ? n.Mark().line + 1 : 0; }

  // A section of scalar settings: its keys checked against the schema. False when it is
  // not a mapping at all (nothing in it can be read).
  bool Section(const YAML::Node& n, const std::string& name) const {
    if (!n.IsMap()) {
      Keep(Error(n, name, "expected a mapping"));
      return false;
    }
    (void)CheckKeys(n, name, Sections().at(name));
    return true;
  }

  // Rejects keys outside `allowed`, each one reported (Keep); fails if any was bad.
  Status CheckKeys(const YAML::Node& map, const std::string& path,
                   const std::set<std::string>& allowed) const {
    if (!map.IsMap()) return Error(map, path, "expected a mapping");
    std::set<std::string> seen;
    bool bad = false;
    for (const auto& kv : map) {
      std::string k = kv.first.as<std::string>();
      if (!seen.insert(k).second) {
        Keep(Error(kv.first, Join(path, k), "duplicate key (the first one would be ignored)"));
        bad = true;
      } else if (!allowed.count(k)) {
        std::string list;
        for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
        Keep(Error(kv.first, Join(path, k), "unknown key (expected one of: " + list + ")"));
        bad = true;
      }
    }
    return bad ? Status::InvalidArgument(path + ": bad keys") : Status::OK();
  }

  static std::string Join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }

  Status Str(const YAML::Node& n, const std::string& key, std::string* out) const {
    if (!n.IsScalar()) return Error(n, key, "expected a string");
    *out = n.as<std::string>();
    return Status::OK();
  }
  Status Bool(const YAML::Node& n, const std::string& key, bool* out) const {
    if (!n.IsScalar()) return Error(n, key, "expected true or false");
    try {
      *out = n.as<bool>();
    } catch (const YAML::Exception&) {
      return Error(n, key, "expected true or false, got '" + n.Scalar() + "'");
    }
    return Status::OK();
  }
  Status Double(const YAML::Node& n, const std::string& key, double lo, double hi,
                double* out) const {
    if (!n.IsScalar()) return Error(n, key, "expected a number");
    try {
      *out = n.as<double>();
    } catch (const YAML::Exception&) {
      return Error(n, key, "expected a number, got '" + n.Scalar() + "'");
    }
    if (!std::isfinite(*out) || *out < lo || *out > hi)
      return Error(n, key, "must be between " + Fmt(lo) + " and " + Fmt(hi));
    return Status::OK();
  }
  Status Int(const YAML::Node& n, const std::string& key, long lo, long hi, long* out) const {
    if (!n.IsScalar()) return Error(n, key, "expected an integer");
    // Decimal only, as YAML 1.2 reads it: yaml-cpp's YAML 1.1 would take 010 as 8 and 0x10
    // as 16, which no one writing a count means.
    const std::string& v = n.Scalar();
    const char* b = v.data() + (!v.empty() && v[0] == '+' ? 1 : 0);
    const char* e = v.data() + v.size();
    auto [end, ec] = std::from_chars(b, e, *out, 10);
    if (b == e || ec != std::errc() || end != e)
      return Error(n, key, "expected an integer (decimal digits), got '" + v + "'");
    if (*out < lo || *out > hi)
      return Error(n, key, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
    return Status::OK();
  }
  Status Duration(const YAML::Node& n, const std::string& key, double* out) const {
    if (!n.IsScalar()) return Error(n, key, "expected a duration such as 30s, 10m or 1h");
    Result<double> d = ParseDuration(n.Scalar());
    if (!d.ok()) return Error(n, key, d.status().message());
    *out = d.value();
    return Status::OK();
  }
  Status Size(const YAML::Node& n, const std::string& key, size_t* out) const {
    if (!n.IsScalar()) return Error(n, key, "expected a size such as 512MiB or 1GiB");
    Result<size_t> s = ParseSize(n.Scalar());
    if (!s.ok()) return Error(n, key, s.status().message());
    *out = s.value();
    return Status::OK();
  }
  Status StrList(const YAML::Node& n, const std::string& key, std::vector<std::string>* out) const {
    if (!n.IsSequence()) return Error(n, key, "expected a list of strings");
    out->clear();
    for (size_t i = 0; i < n.size(); ++i) {
      std::string s;
      CORTEX_RETURN_IF_ERROR(Str(n[i], key + "[" + std::to_string(i) + "]", &s));
      out->push_back(s);
    }
    return Status::OK();
  }

 private:
  static std::string Fmt(double v) {
    std::ostringstream ss;
    ss << v;
    return ss.str();
  }
  std::string source_;
  mutable std::vector<std::string> errors_;
};

// Every key of `map`: CheckKeys with it finds duplicates without restricting names.
std::set<std::string> AllKeys(const YAML::Node& map) {
  std::set<std::string> keys;
  if (map.IsMap())
    for (const auto& kv : map) keys.insert(kv.first.as<std::string>());
  return keys;
}

// Converts plugin-specific YAML settings to JSON for the plugin's create().
nlohmann::json ToJson(const YAML::Node& n) {
  if (n.IsSequence()) {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& e : n) a.push_back(ToJson(e));
    return a;
  }
  if (n.IsMap()) {
    nlohmann::json o = nlohmann::json::object();
    for (const auto& kv : n) o[kv.first.as<std::string>()] = ToJson(kv.second);
    return o;
  }
  if (n.IsNull()) return nullptr;
  return n.Scalar();  // plugins convert scalars themselves
}

Status ParseDaemon(const Parser& p, const YAML::Node& n, DaemonConfig* c) {
  if (!p.Section(n, "daemon")) return Status::OK();
  if (n["allow_group"]) {
    p.Keep(p.Str(n["allow_group"], "daemon.allow_group", &c->allow_group));
    if (!getgrnam(c->allow_group.c_str()))
      p.Keep(p.Error(n["allow_group"], "daemon.allow_group",
                     "no group named '" + c->allow_group + "' on this system"));
  }
  long v = 0;
  if (n["socket"]) p.Keep(p.Str(n["socket"], "daemon.socket", &c->socket));
  if (n["workers"]) {
    p.Keep(p.Int(n["workers"], "daemon.workers", 1, 256, &v));
    c->workers = static_cast<int>(v);
  }
  if (n["max_connections"]) {
    p.Keep(p.Int(n["max_connections"], "daemon.max_connections", 1, 4096, &v));
    c->max_connections = static_cast<int>(v);
  }
  if (n["max_request_bytes"]) {
    p.Keep(p.Int(n["max_request_bytes"], "daemon.max_request_bytes", 1024, 64 << 20, &v));
    c->max_request_bytes = static_cast<size_t>(v);
  }
  if (n["max_text_bytes"]) {
    p.Keep(p.Int(n["max_text_bytes"], "daemon.max_text_bytes", 16, 1 << 20, &v));
    c->max_text_bytes = static_cast<size_t>(v);
  }
  if (n["max_tags"]) {
    p.Keep(p.Int(n["max_tags"], "daemon.max_tags", 0, 1024, &v));
    c->max_tags = static_cast<int>(v);
  }
  if (n["max_queued"]) {
    p.Keep(p.Int(n["max_queued"], "daemon.max_queued", 1, 100000000, &v));
    c->max_queued = static_cast<size_t>(v);
  }
  if (n["idle_timeout"])
    p.Keep(p.Duration(n["idle_timeout"], "daemon.idle_timeout", &c->idle_timeout_s));
  if (n["shutdown_grace"])
    p.Keep(p.Duration(n["shutdown_grace"], "daemon.shutdown_grace", &c->shutdown_grace_s));
  if (n["node"]) {
    Status st = p.Str(n["node"], "daemon.node", &c->node);
    const bool name_ok = !c->node.empty() && c->node.size() <= 64 &&
                         std::all_of(c->node.begin(), c->node.end(), [](unsigned char ch) {
                           return std::isalnum(ch) || ch == '-' || ch == '_' || ch == '.';
                         });
    if (st.ok() && !name_ok)
      st = p.Error(n["node"], "daemon.node",
                   "a node name is 1-64 letters, digits, '-', '_' or '.', got '" + c->node + "'");
    p.Keep(st);
  }
  if (n["node_timeout"]) {
    Status st = p.Duration(n["node_timeout"], "daemon.node_timeout", &c->node_timeout_s);
    if (st.ok() && c->node_timeout_s < 2)
      st = p.Error(n["node_timeout"], "daemon.node_timeout",
                   "must be at least 2s (nodes heartbeat every second)");
    p.Keep(st);
  }
  return Status::OK();
}

Status ParseRouter(const Parser& p, const YAML::Node& n, RouterConfig* c) {
  if (!p.Section(n, "router")) return Status::OK();
  if (n["backend"]) {
    p.Keep(p.Str(n["backend"], "router.backend", &c->backend));
    if (c->backend != "auto" && c->backend != "cpu" && c->backend != "cuda")
      p.Keep(p.Error(n["backend"], "router.backend", "must be auto, cpu or cuda"));
  }
  if (n["exploration"])
    p.Keep(p.Double(n["exploration"], "router.exploration", 0, 1, &c->exploration));
  if (n["load_bias"]) p.Keep(p.Double(n["load_bias"], "router.load_bias", 0, 100, &c->load_bias));
  if (n["health_bias"])
    p.Keep(p.Double(n["health_bias"], "router.health_bias", 0, 100, &c->health_bias));
  long v = 0;
  if (n["max_attempts"]) {
    p.Keep(p.Int(n["max_attempts"], "router.max_attempts", 1, 32, &v));
    c->max_attempts = static_cast<int>(v);
  }
  if (n["seed"]) {
    p.Keep(p.Int(n["seed"], "router.seed", 0, (1L << 62), &v));
    c->seed = static_cast<uint64_t>(v);
  }
  return Status::OK();
}

Status ParseRules(const Parser& p, const YAML::Node& n, std::vector<RuleConfig>* rules) {
  if (!n.IsSequence()) return p.Error(n, "rules", "expected a list of rules");
  std::set<std::string> names;
  // Every rule is looked at, and every field of each: one with a bad boost still has its
  // patterns compiled by the later checks, so one run names every error.
  for (size_t i = 0; i < n.size(); ++i) {
    p.Keep([&]() -> Status {
      const YAML::Node& r = n[i];
      std::string path = "rules[" + std::to_string(i) + "]";
      if (!r.IsMap()) return p.Error(r, path, "expected a mapping");
      (void)p.CheckKeys(r, path, {"name", "match", "expert", "boost", "force"});
      RuleConfig rc;
      rc.line = Parser::Line(r);
      bool usable = true;  // name, patterns and expert read: the later checks can judge it
      auto keep = [&](const Status& st) {
        p.Keep(st);
        return st.ok();
      };
      for (const char* req : {"name", "match", "expert"})
        if (!r[req]) usable = keep(p.Error(r, path + "." + req, "is required")) && usable;
      if (r["name"] && keep(p.Str(r["name"], path + ".name", &rc.name)) &&
          !names.insert(rc.name).second)
        usable = keep(p.Error(r["name"], path + ".name", "duplicate rule name '" + rc.name + "'"));
      if (r["match"]) {
        if (!keep(p.StrList(r["match"], path + ".match", &rc.match))) {
          usable = false;
        } else if (rc.match.empty()) {
          usable = keep(p.Error(r["match"], path + ".match", "must not be empty"));
        }
        for (size_t j = 0; j < rc.match.size(); ++j) {
          rc.match_lines.push_back(Parser::Line(r["match"][j]));
          const std::string& m = rc.match[j];
          if (m.empty() || m == "/" || m == "//")
            usable = keep(p.Error(r["match"][j], path + ".match[" + std::to_string(j) + "]",
                                  "empty pattern")) &&
                     usable;
        }
      }
      if (r["expert"]) usable = keep(p.Str(r["expert"], path + ".expert", &rc.expert)) && usable;
      if (r["boost"]) keep(p.Double(r["boost"], path + ".boost", -10, 10, &rc.boost));
      if (r["force"]) keep(p.Bool(r["force"], path + ".force", &rc.force));
      if (!r["boost"] && !rc.force) keep(p.Error(r, path, "needs a boost, or force: true"));
      // (A config with any error is refused whole; a usable rule goes on only so that
      // --check-config can compile its patterns too.)
      if (usable) rules->push_back(std::move(rc));
      return Status::OK();
    }());
  }
  return Status::OK();
}

Status ParseExperts(const Parser& p, const YAML::Node& n, std::vector<ExpertConfig>* experts) {
  if (!n.IsSequence()) return p.Error(n, "experts", "expected a list of experts");
  std::set<std::string> names;
  static const std::set<std::string> kCommon = {"name",     "plugin",   "description", "keywords",
                                                "examples", "capacity", "timeout"};
  // Every expert is looked at, and each of its settings; only one without a name or a
  // plugin has nothing else judged.
  for (size_t i = 0; i < n.size(); ++i) {
    p.Keep([&]() -> Status {
      const YAML::Node& e = n[i];
      std::string path = "experts[" + std::to_string(i) + "]";
      if (!e.IsMap()) return p.Error(e, path, "expected a mapping");
      (void)p.CheckKeys(e, path, AllKeys(e));  // duplicates only
      ExpertConfig ec;
      ec.line = Parser::Line(e);
      ec.index = static_cast<int>(i);
      for (const char* req : {"name", "plugin"})
        if (!e[req]) return p.Error(e, path + "." + req, "is required");
      auto keep = [&](const Status& st) {
        p.Keep(st);
        return st.ok();
      };
      CORTEX_RETURN_IF_ERROR(p.Str(e["name"], path + ".name", &ec.name));
      // A bad or repeated name is one error; the expert's other settings are still judged,
      // and with a good name its plugin's settings too (by the later checks).
      bool usable = false;
      if (!ValidExpertName(ec.name))
        keep(p.Error(e["name"], path + ".name",
                     "must be 1-64 characters of a-z, 0-9, '-', '_' or '.'"));
      else if (!names.insert(ec.name).second)
        keep(p.Error(e["name"], path + ".name", "duplicate expert name '" + ec.name + "'"));
      else
        usable = true;
      CORTEX_RETURN_IF_ERROR(p.Str(e["plugin"], path + ".plugin", &ec.plugin));
      for (const auto& kv : e) {
        std::string k = kv.first.as<std::string>();
        std::string kp = path + "." + k;
        if (k == "description") {
          std::string s;
          if (keep(p.Str(kv.second, kp, &s))) ec.description = s;
        } else if (k == "keywords" || k == "examples") {
          std::vector<std::string> l;
          if (keep(p.StrList(kv.second, kp, &l))) (k == "keywords" ? ec.keywords : ec.examples) = l;
        } else if (k == "capacity") {
          long v = 0;
          if (keep(p.Int(kv.second, kp, 1, 1024, &v))) ec.capacity = static_cast<int>(v);
        } else if (k == "timeout") {
          double d = 0;
          if (keep(p.Duration(kv.second, kp, &d)) &&
              keep(d > 0 ? Status::OK() : p.Error(kv.second, kp, "must be positive")))
            ec.timeout_s = d;
        } else if (!kCommon.count(k)) {
          // Plugin-specific: validated against the plugin's manifest when it is instantiated.
          ec.settings[k] = ToJson(kv.second);
          ec.key_lines[k] = Parser::Line(kv.first);
        }
      }
      // (A config with any error is refused whole; a usable expert goes on only so that
      // --check-config can try its plugin's settings too.)
      if (usable) experts->push_back(std::move(ec));
      return Status::OK();
    }());
  }
  return Status::OK();
}

// With `errors`, every error is appended there and what did parse is returned (for
// --check-config's later checks); without, any error refuses the whole config.
Result<Config> Parse(const YAML::Node& root, const std::string& source,
                     std::vector<std::string>* errors) {
  Config c;
  c.source = source;
  Parser p(source);
  if (root.IsNull()) return c;  // empty file: all defaults
  if (!root.IsMap()) return p.Error(root, "", "expected a mapping of sections");
  (void)p.CheckKeys(
      root, "",
      {"daemon", "store", "metrics", "plugins", "router", "training", "rules", "experts"});
  if (root["daemon"]) p.Keep(ParseDaemon(p, root["daemon"], &c.daemon));
  if (const YAML::Node& s = root["store"]; s && p.Section(s, "store")) {
    if (s["path"]) p.Keep(p.Str(s["path"], "store.path", &c.store.path));
    if (s["url"]) {
      Status st = p.Str(s["url"], "store.url", &c.store.url);
      if (st.ok() && !IsPostgresUrl(c.store.url))
        st = p.Error(s["url"], "store.url",
                     "expected a PostgreSQL connection URI (postgresql://[user@]host[:port]/"
                     "database[?option=value...]), got '" +
                         RedactUrl(c.store.url) + "'");
      else if (st.ok() && s["path"])
        st = p.Error(s["url"], "store.url",
                     "store.path and store.url exclude each other: path is a SQLite file on "
                     "this machine, url a PostgreSQL database; set one");
      p.Keep(st);
    }
  }
  if (const YAML::Node& s = root["metrics"]; s && p.Section(s, "metrics")) {
    if (s["listen"]) {
      Status st = p.Str(s["listen"], "metrics.listen", &c.metrics.listen);
      std::string host;
      int port = 0;
      if (st.ok() && !c.metrics.listen.empty())
        if (Status bad = ParseMetricsListen(c.metrics.listen, &host, &port); !bad.ok())
          st = p.Error(s["listen"], "metrics.listen", bad.message());
      p.Keep(st);
    }
  }
  if (const YAML::Node& s = root["plugins"]; s && p.Section(s, "plugins")) {
    if (s["dir"]) p.Keep(p.Str(s["dir"], "plugins.dir", &c.plugins.dir));
    if (s["watch"]) p.Keep(p.Bool(s["watch"], "plugins.watch", &c.plugins.watch));
    if (s["bundled"]) p.Keep(p.Bool(s["bundled"], "plugins.bundled", &c.plugins.bundled));
    if (s["isolation"]) {
      p.Keep(p.Str(s["isolation"], "plugins.isolation", &c.plugins.isolation));
      if (c.plugins.isolation != "process" && c.plugins.isolation != "in-process")
        p.Keep(p.Error(s["isolation"], "plugins.isolation", "must be process or in-process"));
    }
    if (s["memory_limit"]) {
      p.Keep(p.Size(s["memory_limit"], "plugins.memory_limit", &c.plugins.memory_limit));
      if (c.plugins.memory_limit && c.plugins.memory_limit < (16u << 20))
        p.Keep(p.Error(s["memory_limit"], "plugins.memory_limit",
                       "must be 0 (no limit) or at least 16MiB"));
    }
    long v = 0;
    if (s["quarantine_after"]) {
      p.Keep(p.Int(s["quarantine_after"], "plugins.quarantine_after", 1, 1000000, &v));
      c.plugins.quarantine_after = static_cast<int>(v);
    }
    if (s["restart_backoff"]) {
      p.Keep(p.Duration(s["restart_backoff"], "plugins.restart_backoff",
                        &c.plugins.restart_backoff_s));
      if (c.plugins.restart_backoff_s > 30)
        p.Keep(p.Error(s["restart_backoff"], "plugins.restart_backoff", "must be at most 30s"));
    }
    if (s["load_timeout"]) {
      p.Keep(p.Duration(s["load_timeout"], "plugins.load_timeout", &c.plugins.load_timeout_s));
      if (c.plugins.load_timeout_s <= 0 || c.plugins.load_timeout_s > 600)
        p.Keep(
            p.Error(s["load_timeout"], "plugins.load_timeout", "must be above 0 and at most 10m"));
    }
    if (s["env"]) {
      p.Keep(p.StrList(s["env"], "plugins.env", &c.plugins.env));
      for (size_t i = 0; i < c.plugins.env.size(); ++i) {
        const std::string& n = c.plugins.env[i];
        if (n.empty() || std::isdigit(static_cast<unsigned char>(n[0])) ||
            n.find_first_not_of(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_") !=
                std::string::npos)
          p.Keep(p.Error(s["env"][i], "plugins.env[" + std::to_string(i) + "]",
                         "'" + n + "' is not an environment variable name"));
      }
    }
  }
  if (root["router"]) p.Keep(ParseRouter(p, root["router"], &c.router));
  if (const YAML::Node& t = root["training"]; t && p.Section(t, "training")) {
    if (t["online"]) p.Keep(p.Bool(t["online"], "training.online", &c.training.online));
    if (t["interval"])
      p.Keep(p.Duration(t["interval"], "training.interval", &c.training.interval_s));
    long v = 0;
    if (t["min_new_outcomes"]) {
      p.Keep(p.Int(t["min_new_outcomes"], "training.min_new_outcomes", 1, 100000000, &v));
      c.training.min_new_outcomes = static_cast<int>(v);
    }
    if (t["epochs"]) {
      p.Keep(p.Int(t["epochs"], "training.epochs", 1, 100, &v));
      c.training.epochs = static_cast<int>(v);
    }
    if (t["population"]) {
      p.Keep(p.Int(t["population"], "training.population", 1, 4, &v));
      c.training.population = static_cast<int>(v);
    }
    if (t["feedback_per_hour"]) {
      p.Keep(p.Int(t["feedback_per_hour"], "training.feedback_per_hour", 1, 1000000, &v));
      c.training.feedback_per_hour = static_cast<int>(v);
    }
    if (t["keep_versions"]) {
      p.Keep(p.Int(t["keep_versions"], "training.keep_versions", 1, 100000, &v));
      c.training.keep_versions = static_cast<int>(v);
    }
    if (t["checkpoint_every"]) {
      p.Keep(p.Int(t["checkpoint_every"], "training.checkpoint_every", 1, 100000000, &v));
      c.training.checkpoint_every = v;
    }
  }
  if (root["rules"]) p.Keep(ParseRules(p, root["rules"], &c.rules));
  if (root["experts"]) p.Keep(ParseExperts(p, root["experts"], &c.experts));
  if (errors) {
    errors->insert(errors->end(), p.errors().begin(), p.errors().end());
    return c;
  }
  if (!p.errors().empty()) return Status::InvalidArgument(JoinLines(p.errors()));
  return c;
}

}  // namespace

std::string Config::Where(int line) const { return source + ":" + std::to_string(line); }

Status ParseMetricsListen(const std::string& listen, std::string* host, int* port) {
  const size_t colon = listen.rfind(':');
  const std::string why = "'" + listen +
                          "' is not HOST:PORT on a loopback address (127.0.0.1:9464, [::1]:9464 or "
                          "localhost:9464): metrics are never served beyond this machine";
  if (colon == std::string::npos || colon == 0) return Status::InvalidArgument(why);
  std::string h = listen.substr(0, colon), p = listen.substr(colon + 1);
  if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(p) > 65535)
    return Status::InvalidArgument("'" + listen +
                                   "': the port must be a number from 0 to 65535 "
                                   "(0: any free port)");
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  bool loopback = h == "localhost" || h == "::1";
  if (!loopback && h.rfind("127.", 0) == 0) {
    int a, b, c, d;
    char tail;
    loopback = std::sscanf(h.c_str(), "%d.%d.%d.%d%c", &a, &b, &c, &d, &tail) == 4 && b >= 0 &&
               b < 256 && c >= 0 && c < 256 && d >= 0 && d < 256;
  }
  if (!loopback) return Status::InvalidArgument(why);
  *host = h == "localhost" ? "127.0.0.1" : h;
  *port = std::stoi(p);
  return Status::OK();
}

const char* EmbeddedDefaultsYaml() { return kDefaults; }

namespace {

Result<Config> LoadString(const std::string& yaml, const std::string& source_name,
                          std::vector<std::string>* errors) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::ParserException& e) {
    return Status::InvalidArgument(source_name + ":" + std::to_string(e.mark.line + 1) +
                                   ": YAML syntax error: " + e.msg);
  } catch (const YAML::Exception& e) {
    return Status::InvalidArgument(source_name + ": " + e.what());
  }
  try {
    Result<Config> c = Parse(root, source_name, errors);
    if (c.ok() && source_name == "<embedded defaults>")
      for (auto& r : c->rules) r.builtin = true;  // named as such, never as the user's lines
    return c;
  } catch (const YAML::Exception& e) {
    return Status::InvalidArgument(source_name + ":" + std::to_string(e.mark.line + 1) + ": " +
                                   e.msg);
  }
}

Result<Config> LoadFile(const std::string& path, std::vector<std::string>* errors) {
  // Read by hand, so that what went wrong (no such file, permission, a folder) is said;
  // only a regular file of sane size is read (a FIFO or a device would never end).
  constexpr off_t kMaxBytes = 4 << 20;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return Status::NotFound("cannot read config file " + path + ": " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > kMaxBytes) {
    const bool dir = S_ISDIR(st.st_mode);
    close(fd);
    return Status::InvalidArgument(
        "cannot read config file " + path + ": " +
        (dir ? std::string(std::strerror(EISDIR))
         : !S_ISREG(st.st_mode)
             ? "not a regular file"
             : "larger than " + std::to_string(kMaxBytes >> 20) + " MiB; not a config"));
  }
  std::string text;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0 && text.size() <= static_cast<size_t>(kMaxBytes))
    text.append(buf, static_cast<size_t>(n));
  const int err = errno;
  close(fd);
  if (n < 0) return Status::IOError("cannot read config file " + path + ": " + std::strerror(err));
  Result<Config> c = LoadString(text, path, errors);
  if (!c.ok()) return c;
  // A user's rules add to the built-in ones; a rule of the same name replaces its
  // built-in namesake.
  Result<Config> builtin = LoadConfigString(kDefaults, "<embedded defaults>");
  if (builtin.ok()) {
    std::set<std::string> names;
    for (const auto& r : c->rules) names.insert(r.name);
    std::vector<RuleConfig> rules;
    for (auto& r : builtin->rules)
      if (!names.count(r.name)) rules.push_back(std::move(r));
    for (auto& r : c->rules) rules.push_back(std::move(r));
    c->rules = std::move(rules);
  }
  // Relative paths are the config file's neighbours, wherever cortexd was started.
  const std::string dir =
      path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  for (std::string* f : {&c->daemon.socket, &c->store.path, &c->plugins.dir})
    if (!f->empty() && (*f)[0] != '/')
      *f = std::filesystem::path(dir + "/" + *f).lexically_normal().string();
  // So is an expert's working folder (the command expert's `cwd`).
  for (auto& e : c->experts)
    if (e.settings.contains("cwd") && e.settings["cwd"].is_string()) {
      std::string w = e.settings["cwd"].get<std::string>();
      if (!w.empty() && w[0] != '/')
        e.settings["cwd"] = std::filesystem::path(dir + "/" + w).lexically_normal().string();
    }
  ResolveDefaultPaths(&c.value());
  return c;
}

}  // namespace

Result<Config> LoadConfigString(const std::string& yaml, const std::string& source_name) {
  return LoadString(yaml, source_name, nullptr);
}
Result<Config> LoadConfigFile(const std::string& path) { return LoadFile(path, nullptr); }
Result<Config> LoadConfigFileForCheck(const std::string& path, std::vector<std::string>* errors) {
  return LoadFile(path, errors);
}

std::string ConfigToYaml(const Config& c) {
  auto dur = [](double s) {
    for (auto [unit, mul] : {std::pair<const char*, double>{"d", 86400}, {"h", 3600}, {"m", 60}})
      if (s >= mul && std::fmod(s, mul) == 0) return fmt::format("{}{}", s / mul, unit);
    if (s > 0 && s < 1) return fmt::format("{}ms", s * 1000);
    return fmt::format("{}s", s);
  };
  auto size = [](size_t b) {
    for (auto [unit, mul] : {std::pair<const char*, size_t>{"GiB", 1ull << 30},
                             {"MiB", 1ull << 20},
                             {"KiB", 1ull << 10}})
      if (b >= mul && b % mul == 0) return fmt::format("{}{}", b / mul, unit);
    return std::to_string(b);
  };
  YAML::Emitter out;
  out.SetDoublePrecision(17);  // doubles go through num() below; this is a backstop
  auto num = [](double v) { return fmt::format("{}", v); };  // shortest that reads back equal
  auto kv = [&](const char* key, const auto& value) {
    out << YAML::Key << key << YAML::Value << value;
  };
  out << YAML::Comment("effective configuration of " + c.source + ", defaults filled in");
  out << YAML::BeginMap;
  const DaemonConfig& d = c.daemon;
  out << YAML::Key << "daemon" << YAML::Value << YAML::BeginMap;
  kv("socket", d.socket);
  kv("workers", d.workers);
  kv("max_connections", d.max_connections);
  kv("max_request_bytes", d.max_request_bytes);
  kv("max_text_bytes", d.max_text_bytes);
  kv("max_tags", d.max_tags);
  kv("max_queued", d.max_queued);
  kv("idle_timeout", dur(d.idle_timeout_s));
  kv("shutdown_grace", dur(d.shutdown_grace_s));
  if (!d.allow_group.empty()) kv("allow_group", d.allow_group);
  if (!d.node.empty()) kv("node", d.node);
  if (!c.store.url.empty()) kv("node_timeout", dur(d.node_timeout_s));
  out << YAML::EndMap;
  out << YAML::Key << "store" << YAML::Value << YAML::BeginMap;
  if (c.store.url.empty())
    out << YAML::Key << "path" << YAML::Value << c.store.path << YAML::EndMap;
  else
    out << YAML::Key << "url" << YAML::Value << RedactUrl(c.store.url) << YAML::EndMap;
  if (!c.metrics.listen.empty()) {
    out << YAML::Key << "metrics" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "listen" << YAML::Value << c.metrics.listen << YAML::EndMap;
  }
  const PluginsConfig& p = c.plugins;
  out << YAML::Key << "plugins" << YAML::Value << YAML::BeginMap;
  kv("dir", p.dir);
  kv("watch", p.watch);
  kv("bundled", p.bundled);
  kv("isolation", p.isolation);
  kv("memory_limit", size(p.memory_limit));
  kv("quarantine_after", p.quarantine_after);
  kv("restart_backoff", dur(p.restart_backoff_s));
  kv("load_timeout", dur(p.load_timeout_s));
  out << YAML::Key << "env" << YAML::Value << YAML::Flow << p.env;
  out << YAML::EndMap;
  const RouterConfig& r = c.router;
  out << YAML::Key << "router" << YAML::Value << YAML::BeginMap;
  kv("backend", r.backend);
  kv("exploration", num(r.exploration));
  kv("load_bias", num(r.load_bias));
  kv("health_bias", num(r.health_bias));
  kv("max_attempts", r.max_attempts);
  kv("seed", r.seed);
  out << YAML::EndMap;
  const TrainingConfig& t = c.training;
  out << YAML::Key << "training" << YAML::Value << YAML::BeginMap;
  kv("interval", dur(t.interval_s));
  kv("min_new_outcomes", t.min_new_outcomes);
  kv("online", t.online);
  kv("epochs", t.epochs);
  kv("population", t.population);
  kv("feedback_per_hour", t.feedback_per_hour);
  kv("keep_versions", t.keep_versions);
  kv("checkpoint_every", t.checkpoint_every);
  out << YAML::EndMap;
  out << YAML::Key << "rules" << YAML::Value << YAML::BeginSeq;
  for (const auto& rule : c.rules) {
    out << YAML::BeginMap;
    kv("name", rule.name);
    out << YAML::Key << "match" << YAML::Value << YAML::Flow << rule.match;
    kv("expert", rule.expert);
    if (!rule.force || rule.boost != 0) kv("boost", num(rule.boost));
    if (rule.force) kv("force", true);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::Key << "experts" << YAML::Value << YAML::BeginSeq;
  for (const auto& e : c.experts) {
    out << YAML::BeginMap;
    kv("name", e.name);
    kv("plugin", e.plugin);
    if (e.description) kv("description", *e.description);
    if (e.keywords) out << YAML::Key << "keywords" << YAML::Value << YAML::Flow << *e.keywords;
    if (e.examples) kv("examples", *e.examples);
    if (e.capacity) kv("capacity", *e.capacity);
    if (e.timeout_s) kv("timeout", dur(*e.timeout_s));
    // Plugin settings came from YAML as JSON; JSON is YAML (flow style).
    for (const auto& [k, v] : e.settings.items())
      out << YAML::Key << k << YAML::Value << YAML::Load(v.dump());
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::vector<std::string> SettingKeys() {
  std::vector<std::string> keys;
  for (const auto& [section, names] : Sections())
    for (const auto& n : names) keys.push_back(section + "." + n);
  return keys;
}

std::map<std::string, std::string> SettingsOf(const Config& c) {
  auto list = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += x + "\n";
    return s;
  };
  auto num = [](double v) {
    std::ostringstream ss;
    ss << v;
    return ss.str();
  };
  const DaemonConfig& d = c.daemon;
  const PluginsConfig& p = c.plugins;
  const RouterConfig& r = c.router;
  const TrainingConfig& t = c.training;
  return {{"daemon.socket", d.socket},
          {"daemon.workers", num(d.workers)},
          {"daemon.max_connections", num(d.max_connections)},
          {"daemon.max_request_bytes", num(static_cast<double>(d.max_request_bytes))},
          {"daemon.max_text_bytes", num(static_cast<double>(d.max_text_bytes))},
          {"daemon.max_tags", num(d.max_tags)},
          {"daemon.shutdown_grace", num(d.shutdown_grace_s)},
          {"daemon.allow_group", d.allow_group},
          {"daemon.idle_timeout", num(d.idle_timeout_s)},
          {"daemon.node", d.node},
          {"daemon.node_timeout", num(d.node_timeout_s)},
          {"daemon.max_queued", num(static_cast<double>(d.max_queued))},
          {"store.path", c.store.path},
          {"store.url", c.store.url},
          {"metrics.listen", c.metrics.listen},
          {"plugins.dir", p.dir},
          {"plugins.watch", num(p.watch)},
          {"plugins.bundled", num(p.bundled)},
          {"plugins.isolation", p.isolation},
          {"plugins.memory_limit", num(static_cast<double>(p.memory_limit))},
          {"plugins.quarantine_after", num(p.quarantine_after)},
          {"plugins.restart_backoff", num(p.restart_backoff_s)},
          {"plugins.env", list(p.env)},
          {"plugins.load_timeout", num(p.load_timeout_s)},
          {"router.backend", r.backend},
          {"router.exploration", num(r.exploration)},
          {"router.load_bias", num(r.load_bias)},
          {"router.health_bias", num(r.health_bias)},
          {"router.max_attempts", num(r.max_attempts)},
          {"router.seed", num(static_cast<double>(r.seed))},
          {"training.interval", num(t.interval_s)},
          {"training.min_new_outcomes", num(t.min_new_outcomes)},
          {"training.online", num(t.online)},
          {"training.epochs", num(t.epochs)},
          {"training.population", num(t.population)},
          {"training.feedback_per_hour", num(t.feedback_per_hour)},
          {"training.keep_versions", num(t.keep_versions)},
          {"training.checkpoint_every", num(static_cast<double>(t.checkpoint_every))}};
}

Config DefaultConfig() {
  Result<Config> c = LoadConfigString(kDefaults, "<embedded defaults>");
  Config out = c.ok() ? std::move(c).value() : Config{};  // the defaults are tested to parse
  ResolveDefaultPaths(&out);
  return out;
}

void ResolveDefaultPaths(Config* config) {
  if (config->daemon.socket.empty()) config->daemon.socket = DefaultSocketPath();
  if (config->store.path.empty() && config->store.url.empty())
    config->store.path = DefaultStorePath();
  if (config->plugins.dir.empty()) config->plugins.dir = DefaultPluginDir();
}

Result<double> ParseDuration(const std::string& text) {
  if (text.empty()) return Status::InvalidArgument("empty duration");
  size_t pos = 0;
  double v;
  try {
    v = std::stod(text, &pos);
  } catch (...) {
    pos = 0;
  }
  // A plain decimal number: stod alone would also take hex, "inf", "nan" and exponents.
  if (pos == 0 || text.substr(0, pos).find_first_not_of("0123456789.-") != std::string::npos)
    return Status::InvalidArgument("not a duration: '" + text + "' (use e.g. 30s, 10m, 1h)");
  std::string unit = text.substr(pos);
  double mul;
  if (unit.empty() || unit == "s")
    mul = 1;
  else if (unit == "ms")
    mul = 0.001;
  else if (unit == "m")
    mul = 60;
  else if (unit == "h")
    mul = 3600;
  else if (unit == "d")
    mul = 86400;
  else
    return Status::InvalidArgument("unknown unit in duration '" + text + "' (ms, s, m, h, d)");
  if (!std::isfinite(v) || v < 0) return Status::InvalidArgument("duration must be >= 0: " + text);
  // Beyond a century a duration is a typo (and would overflow a deadline in microseconds).
  if (v * mul > 100 * 365.25 * 86400)
    return Status::InvalidArgument("duration too long: " + text + " (at most 100 years)");
  return v * mul;
}

bool ValidExpertName(const std::string& n) {
  return !n.empty() && n.size() <= 64 &&
         n.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-_.") == std::string::npos;
}

Result<size_t> ParseSize(const std::string& text) {
  const std::string hint = " (use e.g. 512MiB, 1GiB or 0 for none)";
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0])))
    return Status::InvalidArgument("not a size: '" + text + "'" + hint);
  size_t pos = 0;
  double v;
  try {
    v = std::stod(text, &pos);
  } catch (...) {
    return Status::InvalidArgument("not a size: '" + text + "'" + hint);
  }
  std::string unit = text.substr(pos);
  while (!unit.empty() && unit[0] == ' ') unit.erase(0, 1);
  double mul;
  if (unit.empty() || unit == "B")
    mul = 1;
  else if (unit == "K" || unit == "KiB" || unit == "k")
    mul = 1024.0;
  else if (unit == "M" || unit == "MiB")
    mul = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB")
    mul = 1024.0 * 1024 * 1024;
  else
    return Status::InvalidArgument("unknown unit in size '" + text + "' (B, KiB, MiB, GiB)");
  const double bytes = v * mul;
  if (!std::isfinite(bytes) || bytes > 1e15)
    return Status::InvalidArgument("size too large: " + text);
  return static_cast<size_t>(bytes);
}

}  // namespace cortex
