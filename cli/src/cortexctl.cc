// cortexctl [--socket PATH] [--timeout S] [--json] COMMAND ...
// Exit codes: 0 ok, 1 the request failed, 2 usage error, 3 daemon unreachable (or not
// answering), 4 timed out waiting.
#include <fcntl.h>
#include <fmt/format.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <CLI/CLI.hpp>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string_view>

#include "cortex/client.h"
#include "cortex/config.h"
#include "cortex/html_page.h"
#include "cortex/log.h"
#include "cortex/paths.h"
#include "cortex/protocol.h"
#include "cortex/tags.h"

namespace {

using cortex::Op;

// The request name of an operation (cortex/protocol.h, the one table of them).
const char* OpName(Op op) { return cortex::WireOpOf(op).name; }

// The command that sends `op`, named and described by the protocol table.
CLI::App* OpCommand(CLI::App* parent, Op op) {
  const cortex::WireOp& w = cortex::WireOpOf(op);
  const std::string path = w.command;
  return parent->add_subcommand(path.substr(path.rfind(' ') + 1), w.help);
}

using json = nlohmann::json;

constexpr int kOk = 0, kFailed = 1, kUsage = 2, kUnreachable = 3, kTimedOut = 4;

struct Ctx {
  std::string socket;
  bool json_out = false;
  double timeout = 10;  // --timeout / CORTEX_TIMEOUT: seconds cortexd may stay silent; 0: no bound
};

// A wait (wait, submit --wait, cancel) is given its own timeout and this much more for the
// answer to come back, then exit 4.
constexpr double kWaitGrace = 2;
// How long cortexd waits for a cancelled task to end (sent, so that cortexctl knows it).
constexpr double kCancelWaitS = 30;

std::string Raw(const json& j, const char* k, const std::string& def = "") {
  return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : def;
}
// Text from tasks, experts and the daemon, shown safely (cortex::Printable).
std::string Terminal(const std::string& s, bool keep_lines = false) {
  return cortex::Printable(s, keep_lines);
}
// JSON for stdout. On a terminal every non-ASCII character is written as \uXXXX: the same
// document, but a bidi override or an 8-bit control in task text cannot act on the screen
// (ESC and the other C0 controls are escaped by JSON itself). Redirected, it is UTF-8.
std::string Dump(const json& j, int indent = 2) {
  static const bool tty = isatty(1) == 1;
  return j.dump(indent, ' ', tty, json::error_handler_t::replace);
}
// An error on stderr: a message of several lines (a reload refused for every error in the
// file) keeps its lines, each shown safely and indented under the first.
void SayError(const std::string& msg) {
  std::string out;
  for (const std::string& l : cortex::SplitLines(msg))
    out += (out.empty() ? "cortexctl: " : "  ") + Terminal(l) + "\n";
  std::fputs(out.c_str(), stderr);
}
// Multi-line text (an expert's output) under a heading: every line starts with `prefix`,
// so no line of it can pass for a line of ours. At most `max_lines`; returns the bytes of
// `s` left unprinted.
size_t PrintBlock(const std::string& s, const char* prefix, size_t max_lines = SIZE_MAX) {
  const std::string out = Terminal(s, true);
  size_t lines = 0, pos = 0;
  while (pos < out.size() && lines < max_lines) {
    size_t e = out.find('\n', pos);
    if (e == std::string::npos) e = out.size();
    std::printf("%s%s\n", prefix, out.substr(pos, e - pos).c_str());
    pos = e + 1;
    ++lines;
  }
  return pos < out.size() ? out.size() - pos : 0;
}
// Set once a usage error has been reported; main() reports any kUsage that was not.
bool g_usage_reported = false;

// Every usage error goes through here: on stderr, and under --json also as the one JSON
// document (SPEC: errors too).
int Usage(const Ctx& ctx, const std::string& msg) {
  std::fprintf(stderr, "cortexctl: %s\n", Terminal(msg).c_str());
  if (ctx.json_out) {
    json doc = {{"error", {{"code", "usage"}, {"message", msg}}}};
    // (a message quoting bytes that are not UTF-8 cannot be encoded as they are)
    std::cout << Dump(doc) << "\n";
  }
  g_usage_reported = true;
  return kUsage;
}

// A string field for human output.
std::string Str(const json& j, const char* k, const std::string& def = "") {
  return Terminal(Raw(j, k, def));
}
std::string Num(const json& v, const char* fmt = "%.2f") {
  if (!v.is_number()) return "-";
  char b[32];
  std::snprintf(b, sizeof b, fmt, v.get<double>());
  return b;
}
// A retrain estimate's 95% interval, within what the quantity can be: a policy's mean
// reward lies in [0, 1], a difference ("diff") in [-1, 1]. Newer records carry the bounds;
// older ones only the half-width.
// `v` with `digits` decimals; a value that rounds to zero is "0.000", never "-0.000".
std::string Fixed(double v, int digits) {
  std::string s = fmt::format("{:.{}f}", v, digits);
  if (s[0] == '-' && s.find_first_not_of("-0.") == std::string::npos) s.erase(0, 1);
  return s;
}
// Whether a retrain's metrics hold estimates at all: on fewer held-out decisions than its
// minimum there are none worth showing.
bool Estimated(const json& metrics) {
  return metrics.value("holdout_rows", 0L) >= metrics.value("min_holdout_rows", 0L);
}
std::pair<double, double> Interval(const json& e, const std::string& which) {
  const double lo = which == "diff" ? -1 : 0, v = e.value("value", 0.0), ci = e.value("ci", 0.0);
  return {e.value("low", std::clamp(v - ci, lo, 1.0)),
          e.value("high", std::clamp(v + ci, lo, 1.0))};
}
std::string Pct(const json& v) {
  if (!v.is_number()) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.0f%%", 100 * v.get<double>());
  return b;
}
// Shortens to `w` display columns (counting UTF-8 code points), with an ellipsis.
std::string Fit(const std::string& s, size_t w) {
  std::string out;
  size_t cols = 0;
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
    if (cols + 1 > w || (cols + 1 == w && i + len < s.size())) {
      out += "…";
      return out;
    }
    std::string ch = s.substr(i, len);
    for (char& x : ch)
      if (x == '\n' || x == '\t') x = ' ';
    out += ch;
    ++cols;
    i += len;
  }
  return out;
}
// Pads `s` with spaces to `w` terminal columns (printf's width counts bytes, not the
// columns that UTF-8 text such as "→" takes).
std::string Pad(std::string s, size_t w) {
  size_t cols = 0;
  for (unsigned char c : s) cols += (c & 0xC0) != 0x80;
  if (cols < w) s.append(w - cols, ' ');
  return s;
}
std::string LocalTime(const std::string& iso) {
  // "2026-11-22T16:02:03.123Z" -> "2026-11-22 16:02:03" in local time.
  struct tm tm {};
  if (iso.size() < 19 || !strptime(iso.c_str(), "%Y-%m-%dT%H:%M:%S", &tm)) return iso;
  time_t t = timegm(&tm);
  struct tm lt;
  localtime_r(&t, &lt);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%d %H:%M:%S", &lt);
  return b;
}

// A decimal number as a person writes one: digits, one optional point, an optional
// exponent. strtod alone would also take "inf", "nan" and hex ("0x10"). Underflow
// ("1e-400") is the nearest number, 0; -0 is 0.
bool ParseDecimal(const std::string& s, double* out) {
  size_t i = s[0] == '-' || s[0] == '+' ? 1 : 0, digits = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++digits;
  if (i < s.size() && s[i] == '.')
    for (++i; i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]));) ++i, ++digits;
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    const size_t exp_from = i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    if (i == exp_from) return false;
  }
  if (i != s.size()) return false;
  const double v = std::strtod(s.c_str(), nullptr);
  if (!std::isfinite(v)) return false;  // overflow ("1e999")
  *out = v == 0 ? 0.0 : v;
  return true;
}

// The one check for numeric options: a plain decimal in [lo, hi] (an integer when
// `integer`), rewritten to its canonical form; the message names the option's meaning and
// what was given, and the help shows only `what` (no validator text).
CLI::Validator NumberIn(const std::string& what, double lo, double hi, bool integer = false) {
  return CLI::Validator(
      [what, lo, hi, integer](std::string& v) {
        double d = 0;
        const bool ok = !v.empty() && ParseDecimal(v, &d) && d >= lo && d <= hi &&
                        (!integer || d == std::floor(d));
        if (!ok) return fmt::format("expected {} between {:g} and {:g}, got '{}'", what, lo, hi, v);
        v = integer ? fmt::format("{:.0f}", d) : fmt::format("{}", d);
        return std::string();
      },
      "");
}

// The most rows one history request returns (cortexd's bound).
constexpr int kMaxHistoryRows = 100000;

// "2026-11-22T16:02:03.123Z" (the daemon's times) to unix seconds; 0 if it is not one.
double IsoSeconds(const std::string& iso) {
  struct tm tm {};
  const char* end = strptime(iso.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (!end) return 0;
  double frac = 0;
  if (*end == '.') frac = std::strtod(end, nullptr);
  return static_cast<double>(timegm(&tm)) + frac;
}

// --since: unix seconds, an ISO date or time, or a duration ago ("30m", "2h", "7d").
bool ParseSince(const std::string& s, double* out, std::string* err) {
  if (s.empty()) return true;
  *err = "--since: '" + s +
         "' is not a time (use 2026-11-22, 2026-11-22T10:00:00, a unix time, or 2h / 7d for a "
         "while ago)";
  if (s.find_first_not_of("0123456789.") == std::string::npos) return ParseDecimal(s, out);
  struct tm tm {};
  for (const char* f : {"%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"}) {
    tm = {};
    const char* end = strptime(s.c_str(), f, &tm);
    if (end && (*end == 0 || ((*end == 'Z' || *end == '.')))) {
      // strptime takes 2026-02-31 (and mktime would make it March 3): a date that does
      // not exist is a typo.
      struct tm back = tm;
      if (timegm(&back) == -1 || back.tm_mday != tm.tm_mday || back.tm_mon != tm.tm_mon ||
          back.tm_hour != tm.tm_hour || back.tm_min != tm.tm_min)
        return false;
      bool utc = s.back() == 'Z';
      tm.tm_isdst = -1;
      *out = static_cast<double>(utc ? timegm(&tm) : mktime(&tm));
      return true;
    }
  }
  auto d = cortex::ParseDuration(s);
  if (d.ok() && d.value() >= 0) {
    *out = static_cast<double>(std::time(nullptr)) - d.value();
    return true;
  }
  return false;
}

// Who may use the socket at `path`, for a connect refused with EACCES: cortexd lets in
// its own user, root and the group named by daemon.allow_group (the socket's group).
std::string WhoMayConnect(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0)
    return "a folder on the way to the socket does not let you in; cortexd lets in only its "
           "own user, root and members of daemon.allow_group";
  auto user = [](uid_t u) {
    const passwd* pw = getpwuid(u);
    return pw ? std::string(pw->pw_name) : std::to_string(u);
  };
  auto group = [](gid_t g) {
    const struct group* gr = getgrgid(g);
    return gr ? std::string(gr->gr_name) : std::to_string(g);
  };
  const std::string who = st.st_uid == 0 ? "root" : "user " + user(st.st_uid) + " and root";
  return fmt::format(
      "permission denied: the socket belongs to user {}, group {} (mode {:04o}); only {}{} "
      "may connect (cortexd's daemon.allow_group grants a group)",
      user(st.st_uid), group(st.st_gid), st.st_mode & 07777, who,
      (st.st_mode & 0060) == 0060 ? " and members of group " + group(st.st_gid) : "");
}

// How long cortexctl waits for cortexd's answer to `req` (issue 24: a stopped cortexd held
// every cortexctl for ever). Waits run their own timeout plus kWaitGrace. Every other
// request gets --timeout seconds of silence; those that can legitimately take longer
// (`probe`) go on past that while cortexd still answers a status request as quickly.
struct Deadline {
  double silence_s = 0;  // 0: no bound (--timeout 0)
  bool probe = false;
  bool wait = false;  // a wait: exit 4 when it runs out
  double wait_s = 0;  // the wait's own timeout
};

Deadline DeadlineOf(const Ctx& ctx, const json& req) {
  Deadline d;
  if (ctx.timeout <= 0) return d;
  const std::string op = Raw(req, "op");
  if (op == OpName(Op::kWait) || op == OpName(Op::kCancel) ||
      (op == OpName(Op::kSubmit) && req.value("wait", false))) {
    d.wait = true;
    d.wait_s = req.value("timeout_s", 300.0);  // (cortexd's default)
    d.silence_s = d.wait_s + kWaitGrace;
    return d;
  }
  d.silence_s = ctx.timeout;
  for (Op long_op :
       {Op::kReload, Op::kRetrain, Op::kRollback, Op::kReport, Op::kExport, Op::kHistory})
    d.probe = d.probe || op == OpName(long_op);
  return d;
}

// Whether cortexd answers a status request within --timeout: alive, only busy with a long
// request. Any answer counts (a refusal too).
bool Answers(const Ctx& ctx) {
  cortex::Client c;
  c.SetTimeout(ctx.timeout);
  json resp;
  return c.Connect(ctx.socket).ok() && c.Call({{"op", OpName(Op::kStatus)}}, &resp).ok();
}

// Requests that change something: cortexd may still carry them out when it takes them in
// after cortexctl gave up.
bool Changes(const std::string& op) {
  for (Op o : {Op::kSubmit, Op::kCancel, Op::kFeedback, Op::kReload, Op::kRetrain, Op::kRollback,
               Op::kRelease})
    if (op == OpName(o)) return true;
  return false;
}

// cortexd did not answer in time: says so, and what may still happen; exit 3, or 4 for a
// wait.
int GaveUp(const Ctx& ctx, const json& req, const Deadline& d) {
  const std::string op = Raw(req, "op"), id = Raw(req, "id");
  std::string msg;
  if (d.wait) {
    msg = fmt::format("cortexd does not answer: no answer within the wait's {:g}s and {:g}s more",
                      d.wait_s, kWaitGrace);
    if (op == OpName(Op::kWait))
      msg += fmt::format(
          "; task {} goes on if cortexd does (`cortexctl wait {}` waits again once it answers)", id,
          id);
    else if (op == OpName(Op::kCancel))
      msg += fmt::format(
          "; if cortexd takes the cancel in later, it still applies (`cortexctl show {}` says "
          "once it answers)",
          id);
    else
      msg +=
          "; if cortexd takes the submit in later, the task still runs (`cortexctl history` "
          "shows it once cortexd answers)";
  } else {
    msg = fmt::format("cortexd does not answer at {}: nothing from it in {:g}s{}", ctx.socket,
                      d.silence_s, d.probe ? ", and no answer to a status request either" : "");
    if (op == OpName(Op::kSubmit))
      msg += "; if cortexd takes the submit in later, the task still runs";
    else if (Changes(op))
      msg += "; if cortexd takes the request in later, it is still carried out";
    msg += "\n(--timeout S or CORTEX_TIMEOUT sets how long to wait; 0 waits for ever)";
  }
  SayError(msg);
  if (ctx.json_out)
    std::cout << Dump(json{
                     {"error", {{"code", d.wait ? "timeout" : "unreachable"}, {"message", msg}}}})
              << "\n";
  return d.wait ? kTimedOut : kUnreachable;
}

// Sends one request; prints errors; returns the exit code (and the result in *result).
// `quiet_if_down`: a daemon that does not answer is only the exit code (--follow waits).
int Call(const Ctx& ctx, const json& req, json* result,
         const std::function<void(const json&)>& on_row = nullptr, bool quiet_if_down = false) {
  cortex::Client c;
  const Deadline deadline = DeadlineOf(ctx, req);
  c.SetTimeout(deadline.silence_s,
               deadline.probe ? std::function<bool()>([&ctx] { return Answers(ctx); }) : nullptr);
  cortex::Status st = c.Connect(ctx.socket);
  if (!st.ok() && quiet_if_down) return kUnreachable;
  if (st.code() == cortex::Status::Code::kTimeout) return GaveUp(ctx, req, deadline);
  if (!st.ok() && st.code() == cortex::Status::Code::kPermissionDenied) {
    std::fprintf(stderr, "cortexctl: %s\n  %s\n", Terminal(st.message()).c_str(),
                 Terminal(WhoMayConnect(ctx.socket)).c_str());
    if (ctx.json_out)
      std::cout << Dump(json{{"error", {{"code", "permission_denied"}, {"message", st.message()}}}})
                << "\n";
    return kUnreachable;
  }
  if (!st.ok()) {
    std::fprintf(
        stderr,
        "cortexctl: %s\n  is cortexd running? Start it with `cortexd` (or point --socket / "
        "CORTEX_SOCKET at the socket of a running one).\n",
        Terminal(st.message()).c_str());
    if (ctx.json_out)
      std::cout << Dump(json{{"error", {{"code", "unreachable"}, {"message", st.message()}}}})
                << "\n";
    return kUnreachable;
  }
  json resp;
  st = c.Call(req, &resp, on_row);
  // nlohmann refuses to encode bytes that are not UTF-8: the user's input, a usage error.
  if (st.code() == cortex::Status::Code::kInvalidArgument &&
      st.message().rfind("cannot encode", 0) == 0) {
    return Usage(ctx,
                 "the request holds bytes that are not valid UTF-8 (task text, tags and ids must "
                 "be UTF-8)");
  }
  if (st.code() == cortex::Status::Code::kTimeout)
    return quiet_if_down ? kUnreachable : GaveUp(ctx, req, deadline);
  if (!st.ok()) {
    SayError(st.message());
    if (ctx.json_out)
      std::cout << Dump(json{{"error", {{"code", st.code_name()}, {"message", st.message()}}}})
                << "\n";
    return st.code() == cortex::Status::Code::kUnavailable ? kUnreachable : kFailed;
  }
  if (!resp.value("ok", false)) {
    json e = resp.value("error", json::object());
    SayError(Raw(e, "message", "request failed"));
    if (ctx.json_out) std::cout << Dump(json{{"error", e}}) << "\n";
    return kFailed;
  }
  *result = resp.value("result", json());
  return kOk;
}

// A --follow poll: while cortexd is away (restarting), says so once and keeps waiting.
int FollowCall(const Ctx& ctx, const json& req, json* result) {
  static bool away = false;
  const int rc = Call(ctx, req, result, nullptr, true);
  if (rc == kUnreachable && !away)
    std::fprintf(stderr, "cortexctl: cortexd is not answering; following on once it is back\n");
  away = rc == kUnreachable;
  return rc;
}

void PrintJson(const json& j) { std::cout << Dump(j) << "\n"; }

void PrintCandidates(const json& cands) {
  std::printf("  %-2s %-16s %7s %7s %7s %7s %7s %6s  %s\n", "#", "EXPERT", "RULE", "MODEL", "LOAD",
              "HEALTH", "SCORE", "CONF", "RULES");
  int i = 0;
  for (const auto& c : cands) {
    std::string rules;
    for (const auto& r : c.value("rules", json::array()))
      rules += (rules.empty() ? "" : ",") + r.get<std::string>();
    std::printf("  %-2d %-16s %7s %7s %7s %7s %7s %6s  %s\n", ++i,
                Fit(Str(c, "expert"), 16).c_str(), Num(c["rule_score"], "%.3f").c_str(),
                Num(c["model_score"], "%.3f").c_str(), Num(c["load_bias"], "%.3f").c_str(),
                Num(c.value("health_bias", json(0.0)), "%.3f").c_str(),
                Num(c["score"], "%.3f").c_str(), Pct(c["confidence"]).c_str(), rules.c_str());
  }
  // Why a rule can put a less confident expert first.
  std::printf(
      "  (ranked by SCORE = RULE + MODEL + LOAD + HEALTH; CONF is the model's own "
      "estimate, rules aside)\n");
}

std::string DecisionMode(const json& d) {
  if (d.value("forced", false)) return "forced by a rule";
  if (d.value("explored", false)) return "explored";
  return "greedy";
}

void PrintTask(const json& t, bool full_output) {
  std::printf("task %s  %s\n", Str(t, "id").c_str(), Str(t, "state").c_str());
  std::printf("  text:     %s\n", Str(t, "text").c_str());
  std::string tags;
  const json tag_obj = t.value("tags", json::object());  // items() must not outlive it
  for (const auto& [k, v] : tag_obj.items())
    tags += (tags.empty() ? "" : " ") + Terminal(k) + "=" +
            Terminal(v.is_string() ? v.get<std::string>() : v.dump());
  if (!tags.empty()) std::printf("  tags:     %s\n", tags.c_str());
  std::printf("  created:  %s\n", LocalTime(Str(t, "created_at")).c_str());
  if (!Str(t, "error").empty()) std::printf("  error:    %s\n", Str(t, "error").c_str());
  const json& d = t["decision"];
  if (d.is_object()) {
    std::printf("\ndecision: %s (model %s step %ld, propensity %.3f, %s)\n",
                Str(d, "chosen").c_str(), Str(d, "model_version").c_str(),
                d.value("model_step", 0L), d.value("propensity", 0.0), DecisionMode(d).c_str());
    PrintCandidates(d["candidates"]);
  } else {
    std::printf("\ndecision: not routed yet\n");
  }
  const json& attempts = t["attempts"];
  if (!attempts.empty()) std::printf("\nattempts:\n");
  for (const auto& a : attempts) {
    const json& o = a["outcome"];
    if (!o.is_object()) {
      std::printf("  %d. %-16s running since %s\n", a.value("n", 0), Str(a, "expert").c_str(),
                  LocalTime(Str(a, "started_at")).c_str());
      continue;
    }
    std::printf("  %d. %-16s %-11s quality %.2f  %.3fs%s%s\n", a.value("n", 0),
                Str(a, "expert").c_str(), Str(o, "kind").c_str(), o.value("quality", 0.0),
                o.value("duration_s", 0.0), Str(o, "error").empty() ? "" : "  — ",
                Str(o, "error").c_str());
    const std::string out = Raw(o, "output");
    if (out.empty()) continue;
    if (size_t left = PrintBlock(out, "     | ", full_output ? SIZE_MAX : 12))
      std::printf("     | … (%zu more bytes; `cortexctl show %s --json` has all)\n", left,
                  Str(t, "id").c_str());
  }
  for (const auto& f : t.value("feedback", json::array()))
    std::printf("\nfeedback: quality %.2f by %s at %s%s%s\n", f.value("quality", 0.0),
                Str(f, "by", "?").c_str(), LocalTime(Str(f, "time")).c_str(),
                Str(f, "note").empty() ? "" : ": ", Str(f, "note").c_str());
}

// A CSV text field, quoted where needed; on a terminal, shown safely first (redirected, the
// text is as it was). A spreadsheet runs a cell that starts with = + - @ (or a tab, a
// carriage return or a line feed before one) as a formula: such a field gets a leading '
// (OWASP's rule), and so does one that starts with ' itself, so that dropping one leading '
// from every text cell that has one gives the exact text back. A field that is a plain
// number ("-5", "+1.5e3") is left as it is: a spreadsheet reads it as that number, no
// formula. Number columns are written by cortexctl, never through here.
std::string CsvField(std::string s) {
  static const bool tty = isatty(1) == 1;
  double number;
  if (!s.empty() && std::string_view("=+-@\t\r\n'").find(s[0]) != std::string_view::npos &&
      !ParseDecimal(s, &number))
    s.insert(0, 1, '\'');
  if (tty) s = Terminal(s);
  bool quote = s.find_first_of(",\"\n\r") != std::string::npos;
  std::string out;
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return quote ? "\"" + out + "\"" : out;
}

// The end of a task that `submit --wait` or `wait` waited for: its outcome, the expert
// and the confidence; exit 4 if it is still going, 1 if it did not succeed.
// `print_id`: submit's caller learns the id only here, also when the wait runs out.
int PrintEnded(const Ctx& ctx, const json& result, double timeout, bool print_id = false) {
  if (ctx.json_out) PrintJson(result);
  const std::string state = Str(result, "state");
  const std::string id = Str(result, "id");
  if (result.contains("waited")) {
    if (print_id && !ctx.json_out) std::printf("%s\n", id.c_str());
    std::fprintf(stderr,
                 "cortexctl: task %s is still %s after %gs; `cortexctl wait %s` waits again, "
                 "`cortexctl show %s` shows it\n",
                 id.c_str(), state.c_str(), timeout, id.c_str(), id.c_str());
    return kTimedOut;
  }
  const json& o = result["outcome"];
  const json attempts = result.value("attempts", json::array());
  if (!ctx.json_out) {
    std::printf("%s %s: %s (confidence %s, quality %s, %ss, %zu attempt%s)\n", id.c_str(),
                state.c_str(), Str(result, "expert", "-").c_str(),
                Pct(result["confidence"]).c_str(), o.is_object() ? Num(o["quality"]).c_str() : "-",
                o.is_object() ? Num(o["duration_s"], "%.3f").c_str() : "-", attempts.size(),
                attempts.size() == 1 ? "" : "s");
    if (!attempts.empty()) {
      const json& last = attempts.back()["outcome"];
      if (last.is_object()) PrintBlock(Raw(last, "output"), "  | ");
    }
  }
  if (state == "succeeded") return kOk;
  // Every expert tried declined: say what each one needs.
  bool all_rejected = !attempts.empty();
  for (const auto& a : attempts)
    all_rejected =
        all_rejected && a["outcome"].is_object() && Str(a["outcome"], "kind") == "rejected";
  if (all_rejected) {
    std::fprintf(stderr, "cortexctl: task %s: no expert could take it:\n", id.c_str());
    for (const auto& a : attempts)
      std::fprintf(stderr, "  %-14s %s\n", Str(a, "expert").c_str(),
                   Str(a["outcome"], "error", "declined").c_str());
    std::fprintf(stderr,
                 "  (`cortexctl experts` lists what is loaded; `cortexctl route TEXT` shows how a "
                 "task ranks)\n");
    return kFailed;
  }
  std::fprintf(
      stderr, "cortexctl: task %s %s: %s\n", id.c_str(), state.c_str(),
      o.is_object()
          ? (Str(o, "kind") + (Str(o, "error").empty() ? "" : " — " + Str(o, "error"))).c_str()
          : (Str(result, "error").empty() ? "no outcome" : Str(result, "error").c_str()));
  return kFailed;
}

// A subcommand by name, or null (this CLI11 has no non-throwing lookup).
CLI::App* FindCommand(CLI::App& app, const std::string& name) {
  for (CLI::App* sub : app.get_subcommands({}))
    if (sub->get_name() == name) return sub;
  return nullptr;
}

// The top level of the git work tree around the current folder, or "". When git refuses
// a work tree that is there (one another user owns: "dubious ownership"), *why_not says so.
std::string GitTopLevel(std::string* why_not) {
  int p[2], e[2];
  if (pipe2(p, O_CLOEXEC) != 0) return "";
  if (pipe2(e, O_CLOEXEC) != 0) {
    close(p[0]);
    close(p[1]);
    return "";
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, p[1], 1);
  posix_spawn_file_actions_adddup2(&fa, e[1], 2);
  const char* argv[] = {"git", "rev-parse", "--show-toplevel", nullptr};
  pid_t pid;
  int rc = posix_spawnp(&pid, "git", &fa, nullptr, const_cast<char* const*>(argv), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(p[1]);
  close(e[1]);
  std::string out, err;
  if (rc == 0) {
    char buf[4096];
    ssize_t n;
    // (git says little on stderr: it cannot fill the pipe while stdout is read first)
    while ((n = read(p[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
    while ((n = read(e[0], buf, sizeof buf)) > 0 && err.size() < 65536)
      err.append(buf, static_cast<size_t>(n));
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) out.clear();
  }
  close(p[0]);
  close(e[0]);
  while (!out.empty() && out.back() == '\n') out.pop_back();
  if (out.empty() && err.find("dubious ownership") != std::string::npos) {
    // "fatal: detected dubious ownership in repository at '/x'"
    std::string where;
    if (size_t at = err.find("repository at '"); at != std::string::npos) {
      at += 15;
      where = err.substr(at, err.find('\'', at) - at);
    }
    *why_not = "git refuses the work tree" + (where.empty() ? "" : " at " + where) +
               " (dubious ownership: another user owns it); `git config --global --add "
               "safe.directory " +
               (where.empty() ? "PATH" : where) + "` trusts it, or give --tag repo=PATH";
  }
  return out;
}

// --tag key=value list to the request's tags. A key may be given once, in any case (keys
// are told apart by TagKeyName, as experts see them); the repo tag, in any case, is sent
// as `repo`, and a relative path in it is the caller's, so it is made absolute here
// (cortexd runs elsewhere).
int ParseTagsArg(const Ctx& ctx, const std::vector<std::string>& in, json* tags) {
  *tags = json::object();
  for (const auto& t : in) {
    size_t eq = t.find('=');
    if (eq == std::string::npos || eq == 0)
      return Usage(ctx, "--tag '" + t + "' must look like key=value");
    std::string key = t.substr(0, eq), value = t.substr(eq + 1);
    // What cortexd accepts as a key, checked here so that it is a usage error.
    if (!cortex::ValidTagKey(key))
      return Usage(ctx, "--tag '" + t +
                            "': a key must be 1-64 characters of letters, digits, '_', '.', '-'");
    if (cortex::TagKeyName(key) == "REPO") key = "repo";
    for (const auto& [k, v] : tags->items())
      if (cortex::TagKeyName(k) == cortex::TagKeyName(key))
        return Usage(ctx, "--tag " + key + " is given twice ('" + v.get<std::string>() + "' and '" +
                              value + "'" + (k == key ? "" : ", as " + k + " and " + key) +
                              "); a task has one value per key");
    if (key == "repo" && !value.empty() && value[0] != '/') {
      std::error_code ec;
      value = std::filesystem::absolute(value, ec).lexically_normal().string();
      if (value.size() > 1 && value.back() == '/') value.pop_back();
    }
    (*tags)[key] = value;
  }
  return kOk;
}

// `cortexctl completion SHELL`: a script generated from the same CLI11 definition the
// commands are parsed with, so completion never drifts from the commands.
struct CompletionWords {
  std::string path;                                        // "history", "experts release", ...
  std::vector<std::string> options;                        // long options
  std::vector<std::string> commands;                       // nested subcommands
  std::map<std::string, std::vector<std::string>> values;  // option -> its fixed values
  std::vector<std::string> positional_values;              // e.g. help's COMMAND
};

void CollectWords(CLI::App* app, const std::string& path, std::vector<CompletionWords>* out) {
  CompletionWords w;
  w.path = path;
  for (const CLI::Option* o : app->get_options()) {
    for (const auto& n : o->get_lnames()) w.options.push_back("--" + n);
  }
  for (CLI::App* sub : app->get_subcommands({})) w.commands.push_back(sub->get_name());
  out->push_back(w);
  for (CLI::App* sub : app->get_subcommands({}))
    CollectWords(sub, path.empty() ? sub->get_name() : path + " " + sub->get_name(), out);
}

std::string Join(const std::vector<std::string>& v, const char* sep = " ") {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : sep) + x;
  return s;
}

std::string CompletionScript(const std::string& shell, std::vector<CompletionWords> words,
                             const std::map<std::string, std::vector<std::string>>& values) {
  std::string out;
  if (shell == "bash") {
    out += "# bash completion for cortexctl (generated by `cortexctl completion bash`)\n";
    out += "_cortexctl() {\n  local cur prev path=\"\" w i\n";
    out += "  cur=\"${COMP_WORDS[COMP_CWORD]}\"; prev=\"${COMP_WORDS[COMP_CWORD-1]}\"\n";
    out += "  for ((i = 1; i < COMP_CWORD; i++)); do\n    w=\"${COMP_WORDS[i]}\"\n";
    out += "    case \"$w\" in -*) continue ;; esac\n    case \"${path:+$path }$w\" in\n";
    for (const auto& w : words)
      if (!w.path.empty()) out += "      \"" + w.path + "\") path=\"${path:+$path }$w\" ;;\n";
    out += "    esac\n  done\n  case \"$prev\" in\n";
    for (const auto& [opt, vals] : values)
      out += "    " + opt + ") COMPREPLY=($(compgen -W \"" + Join(vals) +
             "\" -- \"$cur\")); return ;;\n";
    out += "    --socket) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n  esac\n";
    out += "  case \"$path\" in\n";
    for (const auto& w : words) {
      std::vector<std::string> all = w.commands;
      all.insert(all.end(), w.options.begin(), w.options.end());
      all.insert(all.end(), w.positional_values.begin(), w.positional_values.end());
      out += "    \"" + w.path + "\") COMPREPLY=($(compgen -W \"" + Join(all) +
             "\" -- \"$cur\")) ;;\n";
    }
    out += "  esac\n}\ncomplete -F _cortexctl cortexctl\n";
  } else if (shell == "zsh") {
    out +=
        "#compdef cortexctl\n# zsh completion for cortexctl (generated by `cortexctl completion "
        "zsh`)\n";
    out += "_cortexctl() {\n  local -a words_here; local path=\"\" w i\n";
    out += "  for ((i = 2; i < CURRENT; i++)); do\n    w=${words[i]}\n";
    out += "    [[ $w == -* ]] && continue\n    case \"${path:+$path }$w\" in\n";
    for (const auto& w : words)
      if (!w.path.empty()) out += "      \"" + w.path + "\") path=\"${path:+$path }$w\" ;;\n";
    out += "    esac\n  done\n  case ${words[CURRENT-1]} in\n";
    for (const auto& [opt, vals] : values)
      out += "    " + opt + ") compadd -- " + Join(vals) + "; return ;;\n";
    out += "    --socket) _files; return ;;\n  esac\n  case \"$path\" in\n";
    for (const auto& w : words) {
      std::vector<std::string> all = w.commands;
      all.insert(all.end(), w.options.begin(), w.options.end());
      all.insert(all.end(), w.positional_values.begin(), w.positional_values.end());
      out += "    \"" + w.path + "\") compadd -- " + Join(all) + " ;;\n";
    }
    out += "  esac\n}\ncompdef _cortexctl cortexctl 2>/dev/null || true\n";
  } else {  // fish
    out += "# fish completion for cortexctl (generated by `cortexctl completion fish`)\n";
    out += "complete -c cortexctl -f\n";
    for (const auto& w : words) {
      // fish: a word is offered once the words before it are exactly `path`.
      std::string cond =
          w.path.empty() ? "__fish_use_subcommand"
                         : "__fish_seen_subcommand_from " + w.path.substr(w.path.rfind(' ') + 1);
      if (w.path.find(' ') != std::string::npos)
        cond = "__fish_seen_subcommand_from " + w.path.substr(0, w.path.find(' ')) +
               "; and __fish_seen_subcommand_from " + w.path.substr(w.path.rfind(' ') + 1);
      for (const auto& c : w.commands)
        out += "complete -c cortexctl -n '" + cond + "' -a " + c + "\n";
      for (const auto& v : w.positional_values)
        out += "complete -c cortexctl -n '" + cond + "' -a " + v + "\n";
      for (const auto& o : w.options) {
        const std::string name = o.substr(2);
        auto it = values.find(o);
        out += "complete -c cortexctl -n '" + cond + "' -l " + name +
               (it != values.end() ? " -x -a '" + Join(it->second) + "'"
                                   : (name == "socket" ? " -r -F" : "")) +
               "\n";
      }
    }
  }
  return out;
}

}  // namespace

// The whole CLI; main() adds the guarantee that a usage error is always reported.
static int RunCli(int argc, char** argv, Ctx& ctx) {
  CLI::App app{"cortexctl: talk to cortexd — submit tasks and audit its routing decisions",
               "cortexctl"};
  app.require_subcommand(1);
  // (subcommands inherit the footer; those that take an ID add the note on IDs)
  const std::string kExitNote =
      "Exit status: 0 ok, 1 the request failed, 2 usage error, 3 cortexd unreachable, 4 timed "
      "out waiting.";
  app.footer(kExitNote);
  auto id_arg = [&](CLI::App* s, std::string* id) {
    s->add_option("ID", *id, "task id (or a unique prefix of at least 4 characters)")->required();
    s->footer(kExitNote +
              "\nA task ID may be abbreviated to a unique prefix of at least 4 characters.");
  };
  ctx.socket = cortex::DefaultSocketPath();
  app.add_option("--socket", ctx.socket,
                 "cortexd socket (default: $CORTEX_SOCKET or XDG runtime dir)");
  auto* timeout_opt =
      app.add_option("--timeout", ctx.timeout,
                     "seconds cortexd may stay silent before cortexctl gives up, exit 3 "
                     "(default: $CORTEX_TIMEOUT or 10; 0: wait for ever); a wait (wait, submit "
                     "--wait, cancel) takes its own timeout and 2s more, then exit 4")
          ->type_name("S")
          ->transform(NumberIn("seconds", 0, 86400));
  app.add_flag("--json", ctx.json_out, "print exactly one JSON document");
  bool version_flag = false;  // (handled before parsing; here so that --help lists it)
  app.add_flag("--version", version_flag, "print the version and exit");
  auto json_flag = [&](CLI::App* s) {
    s->add_flag("--json", ctx.json_out, "print exactly one JSON document");
  };

  // submit
  std::string text, id;
  std::vector<std::string> tag_args;
  bool wait = false;
  double timeout = 300;
  auto* submit = OpCommand(&app, Op::kSubmit);
  bool no_repo = false;
  submit->add_option("text", text, "the task, one line of text; - reads it from stdin")->required();
  submit->add_option("--tag", tag_args, "key=value (repeatable, one value per key)");
  submit->add_flag("--no-repo", no_repo,
                   "inside a git work tree, do not add repo=<its top level> on its own");
  submit->add_flag("--wait", wait, "wait for the outcome");
  auto* submit_timeout =
      submit->add_option("--timeout", timeout, "seconds to wait with --wait (default 300)")
          ->type_name("S")
          ->transform(NumberIn("seconds", 0, 86400));
  json_flag(submit);
  // wait, cancel
  double wait_timeout = 300;
  auto* waitc = OpCommand(&app, Op::kWait);
  id_arg(waitc, &id);
  waitc->add_option("--timeout", wait_timeout, "seconds to wait (default 300); exit 4 after")
      ->type_name("S")
      ->transform(NumberIn("seconds", 0, 86400));
  json_flag(waitc);
  auto* cancel = OpCommand(&app, Op::kCancel);
  id_arg(cancel, &id);
  json_flag(cancel);
  // route
  auto* route = OpCommand(&app, Op::kRoute);
  route->add_option("text", text, "the task")->required();
  route->add_option("--tag", tag_args, "key=value (repeatable, one value per key)");
  route->add_flag("--no-repo", no_repo, "do not add repo=<git top level> on its own");
  json_flag(route);
  // show
  bool full = false;
  auto* show = OpCommand(&app, Op::kShow);
  id_arg(show, &id);
  show->add_flag("--full", full, "print the experts' whole output");
  json_flag(show);
  // explain
  auto* explain = OpCommand(&app, Op::kExplain);
  id_arg(explain, &id);
  json_flag(explain);
  // history
  int limit = 20;
  std::string expert, since, outcome;
  bool follow = false;
  const std::vector<std::string> kOutcomes = {"success",  "failure",   "timeout",    "crash",
                                              "rejected", "cancelled", "interrupted"};
  auto* history = OpCommand(&app, Op::kHistory);
  history->add_option("--limit", limit, "rows (default 20)")
      ->type_name("N")
      ->transform(NumberIn("a whole number", 1, 100000, true));
  history->add_option("--expert", expert, "only tasks routed to this expert");
  history->add_option("--since", since,
                      "only tasks since TIME: as history prints it, ISO 8601, unix time, or an "
                      "age (90m, 2d)");
  history
      ->add_option("--outcome", outcome,
                   "only tasks that ended so: success, failure, timeout, crash, rejected "
                   "(the last attempt's outcome), cancelled or interrupted")
      ->check(CLI::IsMember(kOutcomes));
  history->add_flag("--follow,-f", follow, "keep printing tasks as they end (Ctrl-C stops)");
  json_flag(history);
  // experts
  auto* experts = OpCommand(&app, Op::kExperts);
  json_flag(experts);
  std::string release_name;
  auto* release = OpCommand(experts, Op::kRelease);
  release->add_option("NAME", release_name, "the quarantined expert")->required();
  json_flag(release);
  // events
  auto* events = OpCommand(&app, Op::kEvents);
  events->add_option("--limit", limit, "rows (default 20)")
      ->type_name("N")
      ->transform(NumberIn("a whole number", 1, 10000, true));
  events->add_flag("--follow,-f", follow, "keep printing new events (Ctrl-C stops)");
  json_flag(events);
  // confidence
  auto* confidence = OpCommand(&app, Op::kConfidence);
  confidence->add_option("--expert", expert, "one expert only");
  json_flag(confidence);
  // feedback
  bool good = false, bad = false;
  double quality = -1;
  std::string note;
  auto* feedback = OpCommand(&app, Op::kFeedback);
  id_arg(feedback, &id);
  auto* g = feedback->add_flag("--good", good, "the outcome was good (quality 1)");
  auto* b = feedback->add_flag("--bad", bad, "the outcome was bad (quality 0)");
  auto* q = feedback->add_option("--quality", quality, "quality in [0,1]")
                ->type_name("Q")
                ->transform(NumberIn("a quality", 0, 1));
  g->excludes(b)->excludes(q);
  b->excludes(q);
  feedback->add_option("--note", note, "why");
  json_flag(feedback);
  // reload, status
  auto* reload = OpCommand(&app, Op::kReload);
  json_flag(reload);
  auto* status = OpCommand(&app, Op::kStatus);
  json_flag(status);
  // retrain, models
  bool retrain_wait = false;
  auto* retrain = OpCommand(&app, Op::kRetrain);
  retrain->add_flag("--wait", retrain_wait, "wait for the candidate and print its metrics");
  json_flag(retrain);
  auto* models = OpCommand(&app, Op::kModels);
  json_flag(models);
  std::string rollback_arg;
  auto* rollback = OpCommand(models, Op::kRollback);
  rollback->add_option("VERSION", rollback_arg, "version number (e.g. 3 or v3)")->required();
  bool rollback_force = false;
  rollback->add_flag("--force", rollback_force, "also a version that was refused at validation");
  json_flag(rollback);
  // export
  std::string format = "jsonl";
  auto* exp = OpCommand(&app, Op::kExport);
  exp->add_option("--format", format, "jsonl or csv")->check(CLI::IsMember({"jsonl", "csv"}));
  auto* format_opt = exp->get_option("--format");
  exp->add_option("--since", since, "only tasks since TIME");
  json_flag(exp);
  // report
  std::string html_file, report_since;
  auto* report = OpCommand(&app, Op::kReport);
  report
      ->add_option("--html", html_file,
                   "write the page to FILE (- for standard output); with --json alone, the "
                   "aggregates it plots are printed instead")
      ->option_text("FILE");
  report
      ->add_option("--since", report_since,
                   "only tasks since TIME (default: from the first task to the last activity)")
      ->option_text("TIME");
  json_flag(report);
  // completion, help
  std::string shell;
  auto* completion = app.add_subcommand("completion", "print a shell completion script");
  completion->add_option("shell", shell, "bash, zsh or fish")
      ->required()
      ->check(CLI::IsMember({"bash", "zsh", "fish"}));
  std::vector<std::string> help_topic;
  auto* help = app.add_subcommand("help", "help on cortexctl, or on one command");
  help->add_option("COMMAND", help_topic, "a command (e.g. history, or models rollback)");

  // --version before anything else (no command is needed for it).
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--version") {
      bool as_json = false;
      for (int j = 1; j < argc; ++j) as_json = as_json || std::string(argv[j]) == "--json";
      if (as_json)
        std::cout << Dump(json{{"version", cortex::CortexVersion()}}) << "\n";
      else
        std::printf("cortexctl %s\n", cortex::CortexVersion());
      return kOk;
    }
    if (a == "--socket" || a == "--timeout")
      ++i;  // (its value)
    else if (a.empty() || a[0] != '-')
      break;
  }
  // Under --json a usage error is a JSON document too.
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--json") ctx.json_out = true;
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e) == 0 ? kOk : kUsage;
  } catch (const CLI::ParseError& e) {
    // The first word that is not an option (or an option's value) names the command.
    std::string word;
    for (int i = 1; i < argc && word.empty(); ++i) {
      const std::string a = argv[i];
      if (a == "--socket" || a == "--timeout")
        ++i;
      else if (a.rfind("-", 0) != 0)
        word = a;
    }
    if (!word.empty() && !FindCommand(app, word)) {
      std::string names;
      for (CLI::App* sub : app.get_subcommands({}))
        names += (names.empty() ? "" : ", ") + sub->get_name();
      return Usage(ctx, "'" + word + "' is not a cortexctl command (commands: " + names +
                            "; `cortexctl help COMMAND` explains one)");
    }
    if (word.empty()) return Usage(ctx, "a command is required; `cortexctl help` lists them");
    // `status --timeout 5`: the bound on cortexd's answer is cortexctl's, not the command's.
    if (dynamic_cast<const CLI::ExtrasError*>(&e) &&
        std::string(e.what()).find("--timeout") != std::string::npos)
      return Usage(ctx, "--timeout goes before the command (cortexctl --timeout S " + word +
                            " ...): it bounds the wait for cortexd's answer; only submit "
                            "--wait and wait take a --timeout of their own");
    return Usage(ctx, std::string(e.what()) + " (`cortexctl help " + word + "` shows its usage)");
  }
  if (help->parsed()) {
    // (app.help() would describe the command parsed: help)
    CLI::App* sub = &app;
    std::string asked;
    for (const auto& word : help_topic) {
      asked += (asked.empty() ? "" : " ") + word;
      CLI::App* next = FindCommand(*sub, word);
      if (!next) return Usage(ctx, "no command named '" + asked + "'; `cortexctl help` lists them");
      sub = next;
    }
    const std::string text = sub->get_formatter()->make_help(
        sub, asked.empty() ? "cortexctl" : "cortexctl " + asked, CLI::AppFormatMode::Normal);
    if (ctx.json_out) return PrintJson(json{{"help", text}}), kOk;  // one document, as always
    std::cout << text;
    return kOk;
  }
  if (completion->parsed()) {
    if (ctx.json_out)
      return Usage(ctx, "completion prints a shell script, not JSON: run it without --json");
    std::vector<CompletionWords> words;
    CollectWords(&app, "", &words);
    std::vector<std::string> cmds;
    for (CLI::App* sub : app.get_subcommands({})) cmds.push_back(sub->get_name());
    for (auto& w : words) {
      if (w.path == "help") w.positional_values = cmds;
      if (w.path == "completion") w.positional_values = {"bash", "zsh", "fish"};
    }
    const std::map<std::string, std::vector<std::string>> values = {{"--format", {"jsonl", "csv"}},
                                                                    {"--outcome", kOutcomes}};
    std::fputs(CompletionScript(shell, words, values).c_str(), stdout);
    return kOk;
  }

  // CORTEX_TIMEOUT, read as --timeout is, when --timeout is not given.
  if (const char* env = getenv("CORTEX_TIMEOUT"); env && !timeout_opt->count()) {
    std::string v = env;
    const std::string err = NumberIn("seconds", 0, 86400)(v);
    if (!err.empty()) return Usage(ctx, "CORTEX_TIMEOUT: " + err);
    ctx.timeout = std::stod(v);
  }

  json result;
  int rc;
  // A prefix shorter than 4 characters would match too much: the caller's usage, said
  // before the daemon is asked.
  if ((waitc->parsed() || cancel->parsed() || show->parsed() || feedback->parsed()) &&
      id.size() < 4)
    return Usage(ctx, "task id '" + id + "' is too short: give at least 4 characters of it");
  if (exp->parsed() && ctx.json_out && format_opt->count() && format == "csv")
    return Usage(ctx,
                 "export: --json prints one JSON document; --format csv prints CSV: choose one");
  if (submit->parsed() || route->parsed()) {
    if (submit->parsed() && text == "-") {  // the text from stdin, one trailing newline off
      std::ostringstream in;
      in << std::cin.rdbuf();
      text = in.str();
      if (!text.empty() && text.back() == '\n') text.pop_back();
      if (!text.empty() && text.back() == '\r') text.pop_back();
    }
    // (cortexd refuses it too, but as a failed request: it is the caller's usage)
    if (text.find_first_not_of(" \t\r\n") == std::string::npos)
      return Usage(ctx, "the task text is empty: a task needs a line of text");
    if (submit->parsed() && submit_timeout->count() && !wait)
      return Usage(ctx, "--timeout needs --wait (it bounds the wait for the outcome)");
    json tags;
    if ((rc = ParseTagsArg(ctx, tag_args, &tags)) != kOk) return rc;
    // Inside a git work tree the repository is what a task is about, unless told otherwise.
    if (!no_repo && !tags.contains("repo")) {
      std::string why_not;
      if (std::string top = GitTopLevel(&why_not); !top.empty())
        tags["repo"] = top;
      else if (!why_not.empty())
        std::fprintf(stderr, "cortexctl: note: no repo tag added: %s\n", Terminal(why_not).c_str());
    }
    json req = {{"op", OpName(submit->parsed() ? Op::kSubmit : Op::kRoute)},
                {"text", text},
                {"tags", tags}};
    if (submit->parsed() && wait) req["wait"] = true, req["timeout_s"] = timeout;
    if ((rc = Call(ctx, req, &result)) != kOk) return rc;
    if (route->parsed()) {
      if (ctx.json_out) return PrintJson(result), kOk;
      std::printf("route: %s\n  would choose %s (model %s; dry run, nothing recorded)\n",
                  Terminal(text).c_str(), Str(result, "chosen").c_str(),
                  Str(result, "model_version").c_str());
      if (result.value("forced", false)) {
        const json& first = result["candidates"].empty() ? json() : result["candidates"][0];
        std::string rules;
        for (const auto& r : first.value("rules", json::array()))
          if (r.is_string()) rules += (rules.empty() ? "" : ", ") + Terminal(r.get<std::string>());
        const std::string waits = Raw(result, "waits_for");
        std::printf("  forced by rule %s: %s only, no fallback%s\n", rules.c_str(),
                    Str(result, "chosen").c_str(),
                    waits == "load"      ? "; it is not loaded, so a task would wait for it"
                    : waits == "release" ? "; it is quarantined, so a task would wait for its "
                                           "release"
                                         : "");
      }
      PrintCandidates(result["candidates"]);
      return kOk;
    }
    if (!wait) {
      if (ctx.json_out)
        PrintJson(result);
      else
        std::printf("%s\n", Str(result, "id").c_str());
      return kOk;
    }
    return PrintEnded(ctx, result, timeout, true);
  }
  if (waitc->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kWait)}, {"id", id}, {"timeout_s", wait_timeout}},
                   &result)) != kOk)
      return rc;
    return PrintEnded(ctx, result, wait_timeout);
  }
  if (cancel->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kCancel)}, {"id", id}, {"timeout_s", kCancelWaitS}},
                   &result)) != kOk)
      return rc;
    if (ctx.json_out) PrintJson(result);
    const std::string state = Str(result, "state");
    if (result.contains("waited")) {
      if (!ctx.json_out)
        std::fprintf(stderr,
                     "cortexctl: task %s was asked to stop and is still %s; `cortexctl wait %s` "
                     "follows it\n",
                     Str(result, "id").c_str(), state.c_str(), Str(result, "id").c_str());
      return kTimedOut;
    }
    if (!ctx.json_out) std::printf("%s %s\n", Str(result, "id").c_str(), state.c_str());
    if (state != "cancelled") {
      std::fprintf(stderr, "cortexctl: task %s ended %s before the cancel took effect\n",
                   Str(result, "id").c_str(), state.c_str());
      return kFailed;
    }
    return kOk;
  }
  if (explain->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kExplain)}, {"id", id}}, &result)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    const json a = result.value("activation", json::object());
    std::printf("task %s: decided by %s at step %ld (live by %s, learning after event %ld)\n",
                Str(result, "id").c_str(), Str(result, "model_version").c_str(),
                result.value("model_step", 0L), Str(a, "reason").c_str(), a.value("after_seq", 0L));
    const long from = result.value("from_checkpoint", 0L);
    std::printf(
        "  rebuilt from %s, %ld step(s) replayed, in %.3fs: %s\n",
        from ? ("the checkpoint at step " + std::to_string(from)).c_str() : "the saved weights",
        result.value("replayed_steps", 0L), result.value("seconds", 0.0),
        result.value("equal", false) ? "every score equals the recorded one, bit for bit"
                                     : "SCORES DIFFER from the recorded ones");
    for (const auto& c : result.value("candidates", json::array())) {
      std::printf("\n%-16s model %.6f (recorded %.6f%s)  prior %.3f\n", Str(c, "expert").c_str(),
                  c.value("model_score", 0.0), c.value("recorded_model_score", 0.0),
                  c.value("equal", false) ? ", equal" : ", DIFFERENT", c.value("prior", 0.0));
      for (const auto& f : c.value("features", json::array()))
        std::printf("    %+8.4f  %s\n", f.value("contribution", 0.0), Str(f, "feature").c_str());
    }
    return kOk;
  }
  if (show->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kShow)}, {"id", id}}, &result)) != kOk) return rc;
    if (ctx.json_out)
      PrintJson(result);
    else
      PrintTask(result, full);
    return kOk;
  }
  if (report->parsed()) {
    if (html_file.empty() && !ctx.json_out)
      return Usage(ctx, "report: --html FILE is required (or --json for the aggregates alone)");
    if (html_file == "-" && ctx.json_out)
      return Usage(ctx, "report: --html - prints the page, --json one JSON document: choose one");
    double since_t = 0;
    std::string err;
    if (!ParseSince(report_since, &since_t, &err)) return Usage(ctx, err);
    json req = {{"op", OpName(Op::kReport)}};
    if (since_t > 0) req["since"] = since_t;
    if ((rc = Call(ctx, req, &result)) != kOk) return rc;
    if (html_file.empty()) return PrintJson(result), kOk;
    const std::string page =
        cortex::html::ChartPage(cortex::html::Page::kReport, "Cortex report", result);
    if (html_file == "-") {
      std::fwrite(page.data(), 1, page.size(), stdout);
      return kOk;  // (main checks that stdout took it)
    }
    if (cortex::Status st = cortex::html::WritePage(html_file, page); !st.ok()) {
      SayError("report: " + st.message());
      if (ctx.json_out)
        std::cout << Dump(json{{"error", {{"code", "io_error"}, {"message", st.message()}}}})
                  << "\n";
      return kFailed;
    }
    const long tasks = result.value("tasks", 0L);
    if (ctx.json_out)
      PrintJson({{"file", html_file},
                 {"bytes", page.size()},
                 {"tasks", tasks},
                 {"since", result.value("since_iso", "")},
                 {"until", result.value("until_iso", "")}});
    else
      std::printf("report: %s (%ld tasks, %s to %s)\n", Terminal(html_file).c_str(), tasks,
                  LocalTime(Str(result, "since_iso")).c_str(),
                  LocalTime(Str(result, "until_iso")).c_str());
    return kOk;
  }
  if (history->parsed() || exp->parsed()) {
    double since_t = 0;
    std::string err;
    if (!ParseSince(since, &since_t, &err)) return Usage(ctx, err);
    if (exp->parsed()) {
      json rows = json::array();
      bool header = false;
      auto on_row = [&](const json& r) {
        if (ctx.json_out) return rows.push_back(r);
        if (format == "jsonl") return (void)std::printf("%s\n", Dump(r, -1).c_str());
        if (!header) {
          std::printf(
              "id,time,expert,confidence,propensity,explored,outcome,quality,feedback_quality,"
              "text\n");
          header = true;
        }
        const json& o = r["outcome"];
        // Every text field through CsvField (ids and times too: not trusted to be harmless);
        // the number columns are cortexctl's own formatting, a missing number an empty cell
        // (not human output's "-", a cell that would start like a formula).
        auto num = [](const json& v, const char* fmt) { return v.is_number() ? Num(v, fmt) : ""; };
        std::printf("%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n", CsvField(Str(r, "id")).c_str(),
                    CsvField(Str(r, "time")).c_str(), CsvField(Str(r, "expert")).c_str(),
                    num(r.value("confidence", json()), "%.4f").c_str(),
                    num(r.value("propensity", json()), "%.4f").c_str(),
                    r.value("explored", false) ? "true" : "false",
                    o.is_object() ? CsvField(Str(o, "kind")).c_str() : "",
                    o.is_object() ? num(o["quality"], "%.3f").c_str() : "",
                    num(r["feedback_quality"], "%.3f").c_str(), CsvField(Raw(r, "text")).c_str());
      };
      json req = {{"op", OpName(Op::kExport)}};
      if (since_t > 0) req["since"] = since_t;
      if ((rc = Call(ctx, req, &result, on_row)) != kOk) return rc;
      if (ctx.json_out) PrintJson(rows);
      return kOk;
    }
    json req = {{"op", OpName(Op::kHistory)}, {"limit", limit}};
    if (!expert.empty()) req["expert"] = expert;
    if (since_t > 0) req["since"] = since_t;
    if (!outcome.empty()) req["outcome"] = outcome;
    // --follow prints the tasks that end after it started, whenever they were created. A
    // snapshot of the whole log, taken before the first page, says which had ended already
    // (never printed by the loop) and which were still open, however old (printed when
    // they end). Rows are asked for unfiltered so that open tasks are seen; the filters
    // are applied here.
    const json all = {{"op", OpName(Op::kHistory)}, {"limit", kMaxHistoryRows}};
    json snapshot = json::array();
    if (follow && (rc = Call(ctx, all, &snapshot)) != kOk) return rc;
    if ((rc = Call(ctx, req, &result)) != kOk) return rc;
    if (ctx.json_out && !follow) return PrintJson(result), kOk;
    // EXPERT is the router's pick, then "→ the expert that ended it" after a fallback;
    // CONF is the router's confidence in the expert shown last.
    bool fallback = false;
    auto print_row = [&](const json& r) {
      if (ctx.json_out)
        return (void)std::printf("%s\n", Dump(r, -1).c_str());  // --follow: a line each
      std::string oc = r["outcome"].is_string() ? r["outcome"].get<std::string>() : Str(r, "state");
      if (r.value("explored", false)) oc += "*";
      std::string who = Str(r, "expert", "-");
      if (!Str(r, "chosen").empty() && Str(r, "chosen") != who) {
        who = Str(r, "chosen") + " → " + who;
        fallback = true;
      }
      std::printf("%-19s  %-12s  %s %5s  %-11s  %s\n", LocalTime(Str(r, "time")).c_str(),
                  Str(r, "id").c_str(), Pad(Fit(who, 24), 24).c_str(), Pct(r["confidence"]).c_str(),
                  oc.c_str(), Fit(Str(r, "text"), 60).c_str());
    };
    if (!ctx.json_out)
      std::printf("%-19s  %-12s  %-24s %5s  %-11s  %s\n", "TIME", "ID", "EXPERT", "CONF", "OUTCOME",
                  "TEXT");
    std::set<std::string> ended;  // printed with their outcome
    auto is_ended = [](const json& r) {
      const std::string st = Raw(r, "state");
      return st == "succeeded" || st == "failed" || st == "cancelled" || st == "interrupted";
    };
    for (const auto& r : result) {
      print_row(r);
      if (is_ended(r)) ended.insert(Str(r, "id"));
    }
    if (!follow) {
      if (result.empty())
        std::printf("(no tasks match)\n");
      else
        std::printf("(%zu shown, newest first; * = exploration%s)\n", result.size(),
                    fallback ? "; a → b: chosen a, ended by b after a fallback" : "");
      return kOk;
    }
    // --follow: every second, the tasks that ended since (oldest first), until interrupted.
    auto matches = [&](const json& r) {
      const std::string st = Raw(r, "state");
      return (since_t <= 0 || IsoSeconds(Raw(r, "time")) >= since_t) &&
             (expert.empty() || Raw(r, "expert") == expert || Raw(r, "chosen") == expert) &&
             (outcome.empty() || st == outcome ||
              ((st == "succeeded" || st == "failed") && Raw(r, "outcome") == outcome));
    };
    // Polls ask for the tasks the store sequenced from the oldest one still open on (or,
    // with none open, from the newest one), less a margin: on PostgreSQL several writers
    // commit their inserts out of sequence order. The store's sequence, not the task's
    // time: a node whose clock is wrong stamps tasks that a time window would not see.
    constexpr long kMargin = 4096;
    auto seq_of = [](const json& r) { return r.value("seq", 0L); };
    auto window_of = [&](const json& rows, long keep) {
      long oldest_open = -1;
      for (const auto& r : rows)
        if (!is_ended(r)) oldest_open = seq_of(r);  // (newest first)
      if (oldest_open >= 0) return oldest_open;
      return rows.empty() ? keep : std::max(keep, seq_of(rows[0]));
    };
    long window = window_of(snapshot, 0);
    std::set<std::string> ended_before;  // ended when --follow started
    for (const auto& r : snapshot)
      if (is_ended(r) && seq_of(r) >= window - kMargin) ended_before.insert(Raw(r, "id"));
    snapshot = json();
    std::fflush(stdout);
    while (true) {
      sleep(1);
      json q = all;
      q["after_seq"] = std::max(0L, window - kMargin - 1);
      if ((rc = FollowCall(ctx, q, &result)) == kUnreachable) continue;
      if (rc != kOk) return rc;
      for (auto it = result.rbegin(); it != result.rend(); ++it)
        if (is_ended(*it) && !ended_before.count(Raw(*it, "id")) &&
            ended.insert(Str(*it, "id")).second && matches(*it))
          print_row(*it);
      window = window_of(result, window);
      std::fflush(stdout);
    }
  }
  if (release->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kRelease)}, {"expert", release_name}}, &result)) != kOk)
      return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    std::printf("expert %s released from quarantine; its next task starts a fresh host\n",
                Terminal(release_name).c_str());
    return kOk;
  }
  if (experts->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kExperts)}}, &result)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    // ROUTED counts decisions (the router's first pick); ATTEMPTS, SUCCESS and QUALITY
    // count every attempt the expert made, fallbacks included.
    // In a cluster, NODE says where each instance runs (other nodes' have no file here).
    const bool cluster =
        !result.empty() && result[0].contains("node") && !result[0]["node"].is_null();
    std::string node_col = cluster ? fmt::format("{:<20} ", "NODE") : "";
    std::printf("%-14s %s%-8s %-11s %6s %7s %8s %8s %8s %7s  %s\n", "NAME", node_col.c_str(),
                "VERSION", "STATE", "LOAD", "ROUTED", "ATTEMPTS", "SUCCESS", "QUALITY", "CRASHES",
                "FILE");
    std::vector<std::string> notes;
    for (const auto& e : result) {
      std::string load =
          std::to_string(e.value("inflight", 0)) + "/" + std::to_string(e.value("capacity", 0));
      const json h = e.value("health", json::object());
      node_col = cluster ? fmt::format("{:<20} ", Fit(Str(e, "node"), 20)) : "";
      std::printf("%-14s %s%-8s %-11s %6s %7ld %8ld %8s %8s %7ld  %s\n",
                  Fit(Str(e, "name"), 14).c_str(), node_col.c_str(),
                  Fit(Str(e, "version", "-"), 8).c_str(), Str(e, "state").c_str(), load.c_str(),
                  e.value("routed", 0L), e.value("attempts", 0L), Pct(e["success_rate"]).c_str(),
                  Num(e["mean_quality"]).c_str(), h.value("crashes", 0L),
                  Str(e, "file", "-").c_str());
      if (Str(e, "state") == "quarantined")
        notes.push_back(Str(e, "name") + " is quarantined since " + Str(h, "quarantined_since") +
                        " (" + Str(h, "last_crash") + "); `cortexctl experts release " +
                        Str(e, "name") + "` lifts it");
    }
    if (!result.empty())
      notes.push_back(
          "(ROUTED: tasks the router chose it for; ATTEMPTS, SUCCESS, QUALITY: every attempt it "
          "made, fallbacks included)");
    for (const auto& n : notes) std::printf("%s\n", n.c_str());
    return kOk;
  }
  if (events->parsed()) {
    // --follow: the first page is the newest `limit`, but every event a poll (the newest
    // 1000) could return that is already there is seen now, so that none is printed as new.
    constexpr int kPoll = 1000;
    json req = {{"op", OpName(Op::kEvents)}, {"limit", follow ? std::max(limit, kPoll) : limit}};
    if ((rc = Call(ctx, req, &result)) != kOk) return rc;
    if (ctx.json_out && !follow) return PrintJson(result), kOk;
    auto print_event = [&](const json& e) {
      if (ctx.json_out)
        return (void)std::printf("%s\n", Dump(e, -1).c_str());  // --follow: a line each
      const std::string file = Str(e, "file"), detail = Str(e, "detail");
      std::printf("%s  %-11s %-12s %s\n", LocalTime(Str(e, "time")).c_str(),
                  Str(e, "event").c_str(),
                  Str(e, "expert").empty() ? "-" : Str(e, "expert").c_str(),
                  (file.empty()     ? detail
                   : detail.empty() ? file
                                    : file + ": " + detail)
                      .c_str());
    };
    std::set<std::string> seen;  // events carry no id: the whole event is its identity
    for (size_t i = result.size(); i-- > 0;) {
      if (i < static_cast<size_t>(limit)) print_event(result[i]);
      seen.insert(result[i].dump());
    }
    while (follow) {
      std::fflush(stdout);
      sleep(1);
      rc = FollowCall(ctx, {{"op", OpName(Op::kEvents)}, {"limit", kPoll}}, &result);
      if (rc == kUnreachable) continue;
      if (rc != kOk) return rc;
      for (auto it = result.rbegin(); it != result.rend(); ++it)
        if (seen.insert(it->dump()).second) print_event(*it);
    }
    return kOk;
  }
  if (confidence->parsed()) {
    json req = {{"op", OpName(Op::kConfidence)}};
    if (!expert.empty()) req["expert"] = expert;
    if ((rc = Call(ctx, req, &result)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    std::printf("%-14s %9s %9s %9s %8s %7s\n", "EXPERT", "DECISIONS", "MEAN CONF", "SUCCESS", "GAP",
                "BRIER");
    for (const auto& e : result)
      std::printf("%-14s %9ld %9s %9s %8s %7s\n", Fit(Str(e, "expert"), 14).c_str(),
                  e.value("decisions", 0L), Pct(e["mean_confidence"]).c_str(),
                  Pct(e["success_rate"]).c_str(), Num(e["gap"], "%+.2f").c_str(),
                  Num(e["brier"], "%.3f").c_str());
    std::printf(
        "(confidence of the chosen expert vs. the outcome of its first attempt; "
        "gap > 0 means over-confident)\n");
    return kOk;
  }
  if (feedback->parsed()) {
    if (!good && !bad && !q->count())
      return Usage(ctx, "feedback needs one of --good, --bad or --quality Q");
    // (-0 would be stored and echoed as -0.0)
    const double qv = good ? 1.0 : bad || quality == 0 ? 0.0 : quality;
    json req = {{"op", OpName(Op::kFeedback)}, {"id", id}, {"quality", qv}};
    if (!note.empty()) req["note"] = note;
    if ((rc = Call(ctx, req, &result)) != kOk) return rc;
    if (ctx.json_out)
      PrintJson(result);
    else
      std::printf(
          "feedback from %s recorded for %s (attempt %d, %s): quality %.2f; reward now "
          "%.2f%s\n",
          Str(result, "by", "?").c_str(), Str(result, "id", id).c_str(), result.value("attempt", 0),
          Str(result, "expert").c_str(), qv, result.value("reward", qv),
          result.value("learned", false) ? ", the live model learns from it now"
          : result.contains("learn_seq")
              ? " (online learning is off: the next retrain learns from it)"
              : "");
    return kOk;
  }
  if (reload->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kReload)}}, &result)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    std::printf("reloaded %s: %d experts, %d rules\n", Str(result, "config").c_str(),
                result.value("experts", 0), result.value("rules", 0));
    for (const auto& k : result.value("applied", json::array()))
      std::printf("  %s changed: applied\n", k.get<std::string>().c_str());
    for (const auto& k : result.value("needs_restart", json::array()))
      std::printf("  %s changed: restart cortexd for it to take effect\n",
                  k.get<std::string>().c_str());
    return kOk;
  }
  if (retrain->parsed()) {
    json req = {{"op", OpName(Op::kRetrain)}, {"wait", retrain_wait}};
    auto on_row = [&](const json& row) {
      if (!ctx.json_out) std::printf("  ... %s\n", Str(row, "progress").c_str());
    };
    if ((rc = Call(ctx, req, &result, on_row)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    if (!retrain_wait) {
      std::printf("retrain queued; `cortexctl models` shows the candidate when it is done\n");
      return kOk;
    }
    if (result.value("skipped", false)) {
      std::printf("retrain %s\n", Str(result, "reason").c_str());
      return kOk;
    }
    const json m = result.value("metrics", json::object());
    auto est = [&](const char* k) {
      if (!Estimated(m)) return std::string("not estimated (too few held-out decisions)");
      auto [lo, hi] = Interval(m.value(k, json::object()), k);
      return Fixed(m.value(k, json::object()).value("value", 0.0), 3) + "  (95% interval " +
             Fixed(lo, 3) + " to " + Fixed(hi, 3) + ")";
    };
    std::printf("candidate %s: %s\n", Str(result, "name").c_str(),
                result.value("live", false) ? "PROMOTED (now live)" : "refused");
    std::printf(
        "  trained on %ld outcomes, validated on %ld held-out decision%s (%s; at least "
        "%ld are needed)\n",
        m.value("train_rows", 0L), m.value("holdout_rows", 0L),
        m.value("holdout_rows", 0L) == 1 ? "" : "s", Str(m, "estimator").c_str(),
        m.value("min_holdout_rows", 0L));
    std::printf("  candidate policy %s\n  live then        %s\n  difference       %s\n",
                est("candidate").c_str(), est("live").c_str(), est("diff").c_str());
    if (m.value("clipped", false))
      std::printf(
          "  (policy values are clipped to the reward range [0,1]: on few decisions the "
          "estimator can leave it)\n");
    std::printf("  %s; %.2fs on %s\n", Str(m, "reason").c_str(), m.value("seconds", 0.0),
                Str(m, "backend").c_str());
    return kOk;
  }
  if (rollback->parsed()) {
    const std::string digits =
        rollback_arg.rfind('v', 0) == 0 ? rollback_arg.substr(1) : rollback_arg;
    if (digits.empty() || digits.size() > 9 ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      return Usage(ctx, "'" + rollback_arg + "' is not a model version (use 3 or v3)");
    }
    const int rollback_version = std::stoi(digits);
    if ((rc = Call(ctx,
                   {{"op", OpName(Op::kRollback)},
                    {"version", rollback_version},
                    {"force", rollback_force}},
                   &result)) != kOk)
      return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    if (result.value("unchanged", false))
      std::printf("model v%d is already live; nothing changed\n", result.value("live_version", 0));
    else
      std::printf("model v%d is live (was v%d)\n", result.value("live_version", 0),
                  result.value("previous", 0));
    return kOk;
  }
  if (models->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kModels)}}, &result)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    std::printf("%-4s %-5s %-9s %-24s %7s %7s %-17s %-17s %s\n", "", "MODEL", "STATUS", "CREATED",
                "TRAIN", "HOLDOUT", "CANDIDATE", "LIVE THEN", "DIFF");
    for (const auto& m : result.value("models", json::array())) {
      const json x = m.value("metrics", json::object());
      auto est = [&](const char* k) {
        if (!x.contains(k) || !Estimated(x)) return std::string("-");
        auto [lo, hi] = Interval(x[k], k);
        return Fixed(x[k].value("value", 0.0), 2) + " [" + Fixed(lo, 2) + "," + Fixed(hi, 2) + "]";
      };
      std::printf(
          "%-4s %-5s %-9s %-24s %7s %7s %-17s %-17s %s\n", m.value("live", false) ? "*" : "",
          Str(m, "name").c_str(), Str(m, "status").c_str(), Str(m, "created", "-").c_str(),
          x.contains("train_rows") ? std::to_string(x.value("train_rows", 0L)).c_str() : "-",
          x.contains("holdout_rows") ? std::to_string(x.value("holdout_rows", 0L)).c_str() : "-",
          est("candidate").c_str(), est("live").c_str(), est("diff").c_str());
    }
    std::printf(
        "(* live; estimates on held-out decisions, with their 95%% interval: the candidate's "
        "picks against the live system's as it made them)\n");
    const json live = result.value("live", json::object());
    std::printf("live: %s since %s (%s) after learning event %ld, %ld online step(s) since\n",
                Str(live, "name").c_str(), Str(live, "since").c_str(), Str(live, "reason").c_str(),
                live.value("after_seq", 0L), live.value("step", 0L));
    return kOk;
  }
  if (status->parsed()) {
    if ((rc = Call(ctx, {{"op", OpName(Op::kStatus)}}, &result)) != kOk) return rc;
    if (ctx.json_out) return PrintJson(result), kOk;
    std::printf("cortexd %s (pid %d), up %.0fs\n", Str(result, "version").c_str(),
                result.value("pid", 0), result.value("uptime_s", 0.0));
    std::printf("  backend:   %s (%s; %s), model %s\n", Str(result, "backend").c_str(),
                Str(result, "backend_device").c_str(), Str(result, "backend_choice").c_str(),
                Str(result, "model_version").c_str());
    const json tr = result.value("training", json::object());
    const json last = tr.value("last_retrain", json());
    std::printf(
        "  training:  %ld new outcomes since the last retrain (every %.0fs once %d are new)%s\n",
        tr.value("new_outcomes", 0L), tr.value("interval_s", 0.0), tr.value("min_new_outcomes", 0),
        last.is_object() && last.contains("name")
            ? fmt::format("; last: {} {}", Str(last, "name"), Str(last, "status")).c_str()
            : "");
    std::printf("  queue:     %d waiting, %d running on %d workers\n",
                result.value("queue_depth", 0), result.value("inflight", 0),
                result.value("workers", 0));
    std::printf("  experts:   %d loaded, %d rules\n", result.value("experts", 0),
                result.value("rules", 0));
    std::string tasks;
    const json by_state = result.value("tasks", json::object());  // items() must not outlive it
    for (const auto& [k, v] : by_state.items())
      tasks += (tasks.empty() ? "" : ", ") + k + " " + std::to_string(v.get<long>());
    if (!Raw(result, "store_read_error", "").empty()) {
      // libpq's messages run over lines: one line here.
      std::string why;
      for (char c : Raw(result, "store_read_error", ""))
        if (!std::isspace(static_cast<unsigned char>(c)))
          why += c;
        else if (!why.empty() && why.back() != ' ')
          why += ' ';
      tasks = "unknown: the store does not answer (" + Terminal(why) + ")";
    }
    std::printf("  tasks:     %s\n", tasks.empty() ? "none yet" : tasks.c_str());
    const json schema = result.value("schema_version", json());
    std::printf("  store:     %s (schema %s)\n", Str(result, "store_path").c_str(),
                schema.is_number() ? fmt::format("v{}", schema.get<int>()).c_str() : "unknown");
    if (!Str(result, "store_error").empty())
      std::printf("  STORE FAILING WRITES: %s\n", Str(result, "store_error").c_str());
    std::printf("  plugins:   %s\n", Str(result, "plugin_dir").c_str());
    std::printf("  socket:    %s\n  config:    %s\n", Str(result, "socket").c_str(),
                Str(result, "config").c_str());
    if (!Str(result, "metrics").empty())
      std::printf("  metrics:   %s\n", Str(result, "metrics").c_str());
    if (!Str(result, "metrics_error").empty())
      std::printf("  METRICS NOT SERVED: %s\n", Str(result, "metrics_error").c_str());
    if (result.contains("nodes") && result["nodes"].is_array()) {
      const std::string trainer = Str(result, "trainer_node");
      std::printf("  cluster:   node %s of %zu; trainer %s\n", Str(result, "node").c_str(),
                  result["nodes"].size(), trainer.empty() ? "none yet" : trainer.c_str());
      for (const auto& n : result["nodes"]) {
        std::string experts;
        for (const auto& e : n.value("experts", json::array()))
          experts += (experts.empty() ? "" : ", ") + e.get<std::string>();
        std::printf(
            "    %-24s %-5s heartbeat %s  experts: %s\n", Str(n, "node").c_str(),
            n.value("alive", false) ? "alive" : "gone",
            Str(n, "heartbeat_at").empty() ? "-" : LocalTime(Str(n, "heartbeat_at")).c_str(),
            experts.empty() ? "none" : experts.c_str());
      }
    }
    return kOk;
  }
  return Usage(ctx, "a command is required; `cortexctl help` lists them");
}

int main(int argc, char** argv) {
  Ctx ctx;
  const int rc = RunCli(argc, argv, ctx);
  // Under --json no usage error may leave stdout empty, whichever path found it.
  if (rc == kUsage && !g_usage_reported)
    Usage(ctx, "usage error; `cortexctl help` explains the commands");
  // What was printed must have been written: a full disk or a closed stdout is a failure,
  // not a silent success.
  std::cout.flush();
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    std::fprintf(stderr, "cortexctl: cannot write to standard output: %s\n", std::strerror(errno));
    return rc == kOk ? kFailed : rc;
  }
  return rc;
}
