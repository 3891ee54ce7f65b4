#include "cortex/rules.h"

#include <algorithm>
#include <set>

namespace cortex {
namespace {
std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}
}  // namespace

Result<RuleSet> RuleSet::Compile(const std::vector<RuleConfig>& rules, const std::string& source) {
  RuleSet set;
  std::set<std::string> experts;
  for (const auto& r : rules) {
    Compiled c;
    c.cfg = r;
    for (const auto& m : r.match) {
      if (m.size() >= 2 && m.front() == '/' && m.back() == '/') {
        try {
          c.regexes.emplace_back(m.substr(1, m.size() - 2),
                                 std::regex::ECMAScript | std::regex::icase | std::regex::optimize);
        } catch (const std::regex_error& e) {
          return Status::InvalidArgument(source + ":" + std::to_string(r.line) + ": rules." +
                                         r.name + ".match: bad regular expression " + m + ": " +
                                         e.what());
        }
      } else {
        c.substrings.push_back(Lower(m));
      }
    }
    experts.insert(r.expert);
    set.rules_.push_back(std::move(c));
  }
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
                        [&](const std::regex& re) { return std::regex_search(text, re); });
    if (hit) out.push_back({r.cfg.name, r.cfg.expert, r.cfg.boost, r.cfg.force});
  }
  return out;
}

}  // namespace cortex
