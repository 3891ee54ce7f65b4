#include "cortex/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace cortex {

Router::Router(RouterOptions options, RuleSet rules, std::unique_ptr<Scorer> scorer,
               FeatureHasher hasher)
    : options_(options),
      rules_(std::move(rules)),
      scorer_(std::move(scorer)),
      hasher_(hasher),
      rng_(options.seed) {}

Status Router::Route(const std::vector<RouteRequest>& batch, const std::vector<ExpertSlot>& experts,
                     bool explore, double now, std::vector<Decision>* out) {
  out->clear();
  if (experts.empty()) return Status::Unavailable("no experts are loaded");
  const size_t E = experts.size();

  std::vector<SparseVector> feats;
  feats.reserve(batch.size());
  for (const auto& r : batch) feats.push_back(hasher_.Task(r.text, r.tags));
  std::vector<ExpertProfile> profiles;
  profiles.reserve(E);
  for (const auto& e : experts) profiles.push_back(e.profile);
  std::vector<float> scores;
  {
    std::lock_guard<std::mutex> l(score_mu_);
    CORTEX_RETURN_IF_ERROR(scorer_->Score(feats, profiles, &scores));
  }

  for (size_t b = 0; b < batch.size(); ++b) {
    Decision d;
    d.time = now;
    d.model_version = scorer_->version();
    std::vector<Candidate> cands(E);
    std::vector<RuleMatch> fired = rules_.Evaluate(batch[b].text);
    std::string forced;
    for (size_t j = 0; j < E; ++j) {
      Candidate& c = cands[j];
      c.expert = experts[j].profile.name;
      c.model_score = scores[b * E + j];
      for (const auto& m : fired) {
        if (m.expert != c.expert) continue;
        c.rule_score += m.boost;
        c.rules.push_back(m.rule);
        if (m.force && forced.empty()) forced = c.expert;
      }
      c.score = c.model_score + c.rule_score;
      c.load_bias = -options_.load_bias * std::clamp(experts[j].load, 0.0, 1.0);
    }
    // Confidence: the router's belief that each expert is the best, from unbiased scores.
    double mx = -1e300, z = 0;
    for (const auto& c : cands) mx = std::max(mx, c.score);
    for (auto& c : cands) z += (c.confidence = std::exp((c.score - mx) / options_.temperature));
    for (auto& c : cands) c.confidence /= z;

    // Selection order: score plus the load bias; ties by name for determinism.
    std::sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& c) {
      double x = a.score + a.load_bias, y = c.score + c.load_bias;
      return x != y ? x > y : a.expert < c.expert;
    });
    const std::string greedy = cands.front().expert;
    if (!forced.empty()) {
      // A forced expert leads; the rest keep their order as the fallback chain.
      auto it = std::find_if(cands.begin(), cands.end(),
                             [&](const Candidate& c) { return c.expert == forced; });
      std::rotate(cands.begin(), it, it + 1);
      d.chosen = forced;
      d.forced = true;
      d.propensity = 1.0;
    } else {
      const double eps = explore ? options_.exploration : 0.0;
      d.chosen = greedy;
      if (eps > 0) {
        std::lock_guard<std::mutex> l(rng_mu_);
        if (std::uniform_real_distribution<double>(0, 1)(rng_) < eps) {
          d.explored = true;
          d.chosen = cands[std::uniform_int_distribution<size_t>(0, E - 1)(rng_)].expert;
        }
      }
      d.propensity = eps / static_cast<double>(E) + (d.chosen == greedy ? 1.0 - eps : 0.0);
      if (d.chosen != greedy) {
        auto it = std::find_if(cands.begin(), cands.end(),
                               [&](const Candidate& c) { return c.expert == d.chosen; });
        std::rotate(cands.begin(), it, it + 1);
      }
    }
    d.candidates = std::move(cands);
    out->push_back(std::move(d));
  }
  return Status::OK();
}

}  // namespace cortex
