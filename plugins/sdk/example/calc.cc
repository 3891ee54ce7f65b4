// calc: an example Cortex expert. It evaluates the arithmetic in a task's text:
//
//   cortexctl submit "calculate 12 * (3 + 4)" --wait      →  12 * (3 + 4) = 84
//
// Numbers, + - * / % ^ (power, right-associative), unary minus and parentheses. A task
// with no arithmetic in it is declined (rejected), so the router falls back to another
// expert and learns not to send such tasks here; a division by zero is a failure.
// Setting `precision` (significant digits, 1-17, default 12) shows instance settings.
//
// Built out of tree against an installed Cortex: see CMakeLists.txt beside this file and
// docs/PLUGINS.md. Nothing here may throw across the boundary: CORTEX_EXPORT_PLUGIN wraps
// Create and Execute, but the code below reports errors as results instead of throwing.
#include <cortex/plugin_sdk.hpp>

#include <cmath>
#include <cstdio>
#include <string>

namespace {

const char* const kKeywords[] = {"calculate", "calculator", "compute",  "arithmetic", "math",
                                 "evaluate",  "sum",        "multiply", "divide",     nullptr};
const char* const kExamples[] = {"calculate 12 * (3 + 4)", "what is 2^10 - 1",
                                 "compute 17.5 + 25 / 4", nullptr};
const char* const kConfigKeys[] = {"precision", nullptr};

// What the router knows of this expert before it has run a task: it scores a new expert
// by how close a task is to its description, keywords and examples.
cortex_manifest MakeManifest() {
  cortex_manifest m{};
  m.name = "calc";  // [a-z0-9._-]{1,64}; the default instance's name
  m.version = "1.0.0";
  m.description =
      "Evaluates the arithmetic expression in the task text: numbers, + - * / % ^ and "
      "parentheses.";
  m.keywords = kKeywords;
  m.examples = kExamples;
  m.config_keys = kConfigKeys;  // settings an `experts:` entry in the config may give it
  m.capacity = 8;               // tasks it runs at once
  m.timeout_ms = 2000;          // default per-task timeout
  m.flags = 0;                  // CORTEX_MANIFEST_REQUIRES_CONFIG: no default instance
  return m;
}
const cortex_manifest kManifest = MakeManifest();

// A recursive-descent parser over one expression. Nesting is bounded, so no task text
// can exhaust the host's stack.
class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  // Parses the whole string; false with a reason in *error otherwise.
  bool Parse(double* out, std::string* error) {
    double v = Expr(0);
    Skip();
    if (error_.empty() && pos_ != s_.size()) error_ = "unexpected '" + s_.substr(pos_, 1) + "'";
    if (!error_.empty()) {
      *error = error_;
      return false;
    }
    *out = v;
    return true;
  }

 private:
  static constexpr int kMaxDepth = 64;

  void Skip() {
    while (pos_ < s_.size() && s_[pos_] == ' ') ++pos_;
  }
  bool Eat(char c) {
    Skip();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  double Fail(const std::string& why) {  // the first error wins; the value no longer matters
    if (error_.empty()) error_ = why;
    return 0;
  }

  double Expr(int depth) {  // term (('+' | '-') term)*
    double v = Term(depth);
    for (;;) {
      if (Eat('+')) {
        v += Term(depth);
      } else if (Eat('-')) {
        v -= Term(depth);
      } else {
        return v;
      }
    }
  }
  double Term(int depth) {  // unary (('*' | '/' | '%') unary)*
    double v = Unary(depth);
    for (;;) {
      if (Eat('*')) {
        v *= Unary(depth);
      } else if (Eat('/') || Eat('%')) {
        const bool mod = s_[pos_ - 1] == '%';
        const double d = Unary(depth);
        if (d == 0) return Fail("division by zero");
        v = mod ? std::fmod(v, d) : v / d;
      } else {
        return v;
      }
    }
  }
  double Unary(int depth) {  // ('-' | '+') unary | power: -2^2 is -(2^2)
    if (depth >= kMaxDepth) return Fail("nested too deeply");
    if (Eat('-')) return -Unary(depth + 1);
    if (Eat('+')) return Unary(depth + 1);
    return Power(depth);
  }
  double Power(int depth) {  // primary ('^' unary)?, so 2^3^2 is 2^(3^2)
    const double base = Primary(depth);
    if (!Eat('^')) return base;
    return std::pow(base, Unary(depth + 1));
  }
  double Primary(int depth) {  // number | '(' expr ')'
    if (Eat('(')) {
      const double v = Expr(depth + 1);
      if (!Eat(')')) return Fail("missing ')'");
      return v;
    }
    Skip();
    // Digits by hand: strtod would follow the locale's decimal separator.
    double v = 0, scale = 1;
    bool digits = false, point = false;
    for (; pos_ < s_.size(); ++pos_) {
      const char c = s_[pos_];
      if (c >= '0' && c <= '9') {
        digits = true;
        if (point) scale /= 10;
        v = v * 10 + (c - '0');
      } else if (c == '.' && !point) {
        point = true;
      } else {
        break;
      }
    }
    if (!digits)
      return Fail(pos_ < s_.size() ? "expected a number at '" + s_.substr(pos_, 1) + "'"
                                   : std::string("expected a number at the end"));
    return v * scale;
  }

  const std::string& s_;
  size_t pos_ = 0;
  std::string error_;
};

// The expression in "calculate 12 * (3 + 4) please": the longest run of characters an
// expression can hold that has a digit in it, trimmed. Empty when there is none.
std::string FindExpression(const std::string& text) {
  auto allowed = [](char c) {
    return (c >= '0' && c <= '9') || c == '.' || c == ' ' || c == '(' || c == ')' || c == '+' ||
           c == '-' || c == '*' || c == '/' || c == '%' || c == '^';
  };
  std::string best;
  for (size_t i = 0; i < text.size();) {
    if (!allowed(text[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && allowed(text[j])) ++j;
    std::string run = text.substr(i, j - i);
    size_t a = run.find_first_not_of(' '), b = run.find_last_not_of(' ');
    run = a == std::string::npos ? "" : run.substr(a, b - a + 1);
    if (run.find_first_of("0123456789") != std::string::npos && run.size() > best.size())
      best = run;
    i = j;
  }
  return best;
}

class Calc {
 public:
  // Called once per instance with its settings (a JSON object: {} for the default
  // instance). Returning nullptr with *err set refuses the instance; start the message
  // with the offending key.
  static Calc* Create(const nlohmann::json& settings, std::string* err) {
    int precision = 12;
    if (settings.contains("precision")) {
      // From a YAML config every scalar arrives as a string ("4"); accept a number too.
      const auto& p = settings["precision"];
      const std::string s = p.is_string() ? p.get<std::string>() : p.dump();
      if (s.empty() || s.size() > 2 || s.find_first_not_of("0123456789") != std::string::npos ||
          std::stoi(s) < 1 || std::stoi(s) > 17) {
        *err = "precision: expected an integer from 1 to 17";
        return nullptr;
      }
      precision = std::stoi(s);
    }
    return new Calc(precision);
  }

  // Called for each task, on up to `capacity` threads at once: keep it free of shared
  // mutable state (this one has none).
  cortex_result Execute(const cortex_task& task, const cortex_host& host) const {
    const std::string text = task.text ? task.text : "";
    const std::string expr = FindExpression(text);
    if (expr.empty())  // not our kind of task: decline, and the task falls back
      return cortex::sdk::Result(CORTEX_OUTCOME_REJECTED, 0, "no arithmetic in the task");
    double value = 0;
    std::string error;
    if (!Parser(expr).Parse(&value, &error)) {
      cortex::sdk::Write(host, expr + ": " + error + "\n");
      // Results' error strings must outlive the call: use string literals (or members).
      return cortex::sdk::Result(
          CORTEX_OUTCOME_FAILURE, 0,
          error == "division by zero" ? "division by zero" : "cannot evaluate the expression");
    }
    if (!std::isfinite(value))
      return cortex::sdk::Result(CORTEX_OUTCOME_FAILURE, 0, "the result is not a finite number");
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*g", precision_, value);
    cortex::sdk::Write(host, expr + " = " + buf + "\n");
    return cortex::sdk::Result(CORTEX_OUTCOME_SUCCESS, 1.0);
  }

 private:
  explicit Calc(int precision) : precision_(precision) {}
  const int precision_;
};

}  // namespace

// The one exported symbol: cortex_plugin_entry, returning the ABI version, the manifest
// and the Create/Execute/destroy thunks (which catch any exception).
CORTEX_EXPORT_PLUGIN(Calc, &kManifest)
