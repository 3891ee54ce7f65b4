// Keyword rules from the config: case-insensitive substrings or /regex/, each boosting
// one expert or forcing it (policy).
#pragma once

#include <regex>
#include <string>
#include <vector>

#include "cortex/config.h"
#include "cortex/status.h"

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
  // Fails on a bad regular expression, naming the config file and line.
  static Result<RuleSet> Compile(const std::vector<RuleConfig>& rules, const std::string& source);
  // The rules that fire for `text`, in config order.
  std::vector<RuleMatch> Evaluate(const std::string& text) const;
  size_t size() const { return rules_.size(); }
  const std::vector<std::string>& Experts() const { return experts_; }

 private:
  struct Compiled {
    RuleConfig cfg;
    std::vector<std::string> substrings;  // lower-cased
    std::vector<std::regex> regexes;
  };
  std::vector<Compiled> rules_;
  std::vector<std::string> experts_;
};

}  // namespace cortex
