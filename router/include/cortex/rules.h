// Keyword rules from the config: case-insensitive substrings or /regex/, each boosting
// one expert or forcing it (policy). Regexes are RE2's: matching takes time linear in the
// text and no stack, so no task text can hang or crash the router.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cortex/config.h"
#include "cortex/status.h"

namespace re2 {
class RE2;
}

namespace cortex {

struct RuleMatch {
  std::string rule;
  std::string expert;
  double boost = 0;
  bool force = false;
};

class RuleSet {
 public:
  RuleSet() = default;
  // Fails on a regular expression RE2 cannot compile (bad syntax, backreferences,
  // lookaround, or too large), naming the config file, line, rule and pattern.
  static Result<RuleSet> Compile(const std::vector<RuleConfig>& rules, const std::string& source);
  // The rules that fire for `text`, in config order.
  std::vector<RuleMatch> Evaluate(const std::string& text) const;
  size_t size() const { return rules_.size(); }
  const std::vector<std::string>& Experts() const { return experts_; }

 private:
  struct Compiled {
    RuleConfig cfg;
    std::vector<std::string> substrings;                   // lower-cased
    std::vector<std::shared_ptr<const re2::RE2>> regexes;  // immutable: shared by copies
  };
  std::vector<Compiled> rules_;
  std::vector<std::string> experts_;
};

}  // namespace cortex
