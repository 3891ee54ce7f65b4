#include "cortex/router.h"

#include "cortex/explore.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <thread>

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

  // Featurizing is the largest serial cost of a big batch: split it over two threads.
  std::vector<SparseVector> feats(batch.size());
  auto featurize = [&](size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; ++i) feats[i] = hasher_.Task(batch[i].text, batch[i].tags);
  };
  if (batch.size() >= 256 && std::thread::hardware_concurrency() > 1) {
    std::thread t(featurize, batch.size() / 2, batch.size());
    featurize(0, batch.size() / 2);
    t.join();
  } else {
    featurize(0, batch.size());
  }
  std::vector<ExpertProfile> profiles;
  profiles.reserve(E);
  for (const auto& e : experts) profiles.push_back(e.profile);
  std::vector<float> scores;
  ScoreInfo info;
  {
    std::lock_guard<std::mutex> l(score_mu_);
    CORTEX_RETURN_IF_ERROR(scorer_->Score(feats, profiles, &scores, &info));
  }

  for (size_t b = 0; b < batch.size(); ++b) {
    Decision d;
    d.time = now;
    d.model_version = info.version;
    d.model_live = info.live;
    d.model_step = info.step;
    std::vector<Candidate> cands(E);
    std::vector<RuleMatch> fired = rules_.Evaluate(batch[b].text);
    // The first force rule that fired (in rule order) is policy, loaded or not: a forced
    // expert that is not loaded still leads, alone, so the task waits for it instead of
    // running elsewhere.
    std::string forced;
    for (const auto& m : fired)
      if (m.force) {
        forced = m.expert;
        break;
      }
    auto add_rules = [&](Candidate* c) {  // the rules that fired for c's expert
      for (const auto& m : fired)
        if (m.expert == c->expert) {
          c->rule_score += m.boost;
          c->rules.push_back(m.rule);
        }
    };
    for (size_t j = 0; j < E; ++j) {
      Candidate& c = cands[j];
      c.expert = experts[j].profile.name;
      c.model_score = scores[b * E + j];
      if (!info.priors.empty()) c.prior = info.priors[b * E + j];
      add_rules(&c);
      c.score = c.model_score + c.rule_score;
      // "+ 0.0" turns a -0.0 (no load, no crashes) into 0, which is what the audit shows.
      c.load_bias = -options_.load_bias * std::clamp(experts[j].load, 0.0, 1.0) + 0.0;
      c.health_bias = -options_.health_bias * std::clamp(experts[j].health, 0.0, 1.0) + 0.0;
    }
    // Confidence: the model's estimate of this expert's reward for the task (calibrated
    // against logged outcomes by training); rules and load do not change it.
    for (auto& c : cands) c.confidence = std::clamp(c.model_score, 0.0, 1.0);

    // Selection order: score plus the load and health biases; ties by name for
    // determinism. Crashes steer selection here instead of training the model: a crash
    // says the expert is unwell, not that the task belonged elsewhere.
    std::sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& c) {
      double x = a.score + a.load_bias + a.health_bias, y = c.score + c.load_bias + c.health_bias;
      return x != y ? x > y : a.expert < c.expert;
    });
    const std::string greedy = cands.front().expert;
    d.greedy = greedy;
    if (!forced.empty() && std::none_of(cands.begin(), cands.end(),
                                        [&](const Candidate& c) { return c.expert == forced; })) {
      Candidate c;  // not loaded: no model or confidence; it is never the greedy pick
      c.expert = forced;
      add_rules(&c);
      c.score = c.rule_score;
      cands.push_back(std::move(c));
    }
    if (!forced.empty()) {
      // A forced expert leads; the rest keep their order as the fallback chain.
      auto it = std::find_if(cands.begin(), cands.end(),
                             [&](const Candidate& c) { return c.expert == forced; });
      std::rotate(cands.begin(), it, it + 1);
      d.chosen = forced;
      d.forced = true;
      d.propensity = 1.0;
    } else {
      // The rate depends on this decision's scores only, so the logged propensity is exact.
      std::vector<double> in_order(E);
      for (size_t j = 0; j < E; ++j) in_order[j] = cands[j].score;
      ExploreOptions eo;
      eo.rate = explore ? options_.exploration : 0.0;
      const Exploration ex = Explore(in_order, cands.front().confidence, eo);
      size_t pick = 0;
      if (ex.epsilon > 0) {
        std::lock_guard<std::mutex> l(rng_mu_);
        pick = Sample(ex, &rng_, &d.explored);
      }
      d.chosen = cands[pick].expert;
      d.propensity = ex.Probability(pick);
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
