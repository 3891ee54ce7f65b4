#include "cortex/rules.h"

#include <re2/re2.h>

#include <algorithm>
#include <set>

namespace cortex {
namespace {
std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}
constexpr int kMaxRegexProgram = 2000;

}  // namespace

Result<RuleSet> RuleSet::Compile(const std::vector<RuleConfig>& rules, const std::string& source) {
  RuleSet set;
  std::set<std::string> experts;
  std::vector<std::string> errors;  // every bad pattern, not only the first
  for (const auto& r : rules) {
    Compiled c;
    c.cfg = r;
    for (size_t j = 0; j < r.match.size(); ++j) {
      const std::string& m = r.match[j];
      const int line = j < r.match_lines.size() ? r.match_lines[j] : r.line;
      if (m.size() >= 2 && m.front() == '/' && m.back() == '/') {
        RE2::Options o;
        o.set_case_sensitive(false);
        o.set_log_errors(false);  // the error goes into the Status instead of stderr
        auto re = std::make_shared<const RE2>(m.substr(1, m.size() - 2), o);
        if (!re->ok()) {
          errors.push_back(
              source + ":" + std::to_string(line) + ": rules." + r.name +
              ".match: bad regular expression " + m + ": " + re->error() +
              " (RE2 syntax: no backreferences or lookaround; matching is linear-time)");
          continue;
        }
        // Linear time is per byte of text and per instruction of the pattern: a pattern
        // of thousands of instructions (large counted repetitions) would make routing one
        // task take seconds, so such a pattern is refused like a bad one.
        if (re->ProgramSize() > kMaxRegexProgram) {
          errors.push_back(source + ":" + std::to_string(line) + ": rules." + r.name + ".match: " +
                           m + " is too large for a rule (" + std::to_string(re->ProgramSize()) +
                           " RE2 instructions; the limit is " + std::to_string(kMaxRegexProgram) +
                           "): use smaller repetition counts, or several rules");
          continue;
        }
        c.regexes.push_back(std::move(re));
      } else {
        c.substrings.push_back(Lower(m));
      }
    }
    experts.insert(r.expert);
    set.rules_.push_back(std::move(c));
  }
  if (!errors.empty()) return Status::InvalidArgument(JoinLines(errors));
  set.experts_.assign(experts.begin(), experts.end());
  return set;
}

std::vector<RuleMatch> RuleSet::Evaluate(const std::string& text) const {
  std::vector<RuleMatch> out;
  if (rules_.empty()) return out;
  const std::string lower = Lower(text);
  for (const auto& r : rules_) {
    bool hit = std::any_of(r.substrings.begin(), r.substrings.end(), [&](const std::string& s) {
      return lower.find(s) != std::string::npos;
    });
    if (!hit)
      hit = std::any_of(r.regexes.begin(), r.regexes.end(),
                        [&](const auto& re) { return RE2::PartialMatch(text, *re); });
    if (hit) out.push_back({r.cfg.name, r.cfg.expert, r.cfg.boost, r.cfg.force});
  }
  return out;
}

}  // namespace cortex
