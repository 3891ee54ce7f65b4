#include "cortex/learner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

namespace cortex {
namespace {

// "Not worse" allows for rounding: a candidate that makes the same choices as the live
// policy can land a hair below it through float noise in the reward model.
constexpr double kNotWorseTolerance = 1e-3;
// Fewer held-out decisions than this give an interval too wide to decide on.
constexpr size_t kMinValidationDecisions = 20;

PolicyEstimate MeanCi(const std::vector<double>& v) {
  PolicyEstimate e;
  if (v.empty()) return e;
  double s = 0, ss = 0;
  for (double x : v) s += x;
  e.value = s / v.size();
  for (double x : v) ss += (x - e.value) * (x - e.value);
  if (v.size() > 1) e.ci = 1.96 * std::sqrt(ss / (v.size() - 1) / v.size());
  return e;
}

// The 95% interval as bounds too, clipped to what the quantity can be (a policy's mean
// reward lies in [0, 1], a difference of two in [-1, 1]): a small holdout's half-width can
// exceed the whole range, and an interval outside it would only mislead. `e` is the
// unclipped estimate: the value shown is clipped, and the bounds are the clipped ends of
// its own interval, so value and interval never disagree.
nlohmann::json EstimateJson(const PolicyEstimate& e, double lo, double hi) {
  // "+ 0.0": a -0.0 shows as 0.
  return {{"value", std::clamp(e.value, lo, hi) + 0.0},
          {"ci", e.ci},
          {"low", std::clamp(e.value - e.ci, lo, hi) + 0.0},
          {"high", std::clamp(e.value + e.ci, lo, hi) + 0.0}};
}

}  // namespace

Learner::Learner(LearnerOptions options, FeatureHasher hasher,
                 std::unique_ptr<GatingEngine> score_engine,
                 std::unique_ptr<GatingEngine> train_engine)
    : options_(options),
      hasher_(hasher),
      score_engine_(std::move(score_engine)),
      train_engine_(std::move(train_engine)),
      online_engine_(MakeCpuEngine()),
      live_(options.shape) {}

int Learner::live_version() const {
  std::lock_guard<std::mutex> l(mu_);
  return version_;
}

long Learner::trained_through() const {
  std::lock_guard<std::mutex> l(mu_);
  return trained_through_;
}

std::map<std::string, SparseVector> Learner::ManifestsOf(
    const std::vector<std::string>& experts) const {
  std::lock_guard<std::mutex> l(mu_);  // a copy, so featurizing never blocks scoring
  std::map<std::string, SparseVector> out;
  for (const auto& e : experts)
    if (auto it = manifests_.find(e); it != manifests_.end()) out.insert(*it);
  return out;
}

float Learner::PriorOf(const std::map<std::string, SparseVector>& manifests, const SparseVector& x,
                       const std::string& expert) {
  auto it = manifests.find(expert);
  return it == manifests.end() ? 0.0f : std::max(0.0f, Dot(x, it->second));
}

void Learner::SetManifest(const std::string& expert, const SparseVector& manifest) {
  std::lock_guard<std::mutex> l(mu_);
  PutManifest(expert, manifest);
}

void Learner::PutManifest(const std::string& expert, const SparseVector& manifest) {
  auto [it, added] = manifests_.try_emplace(expert);
  SparseVector& cur = it->second;
  if (!added && cur.idx == manifest.idx && cur.val.size() == manifest.val.size() &&
      (cur.val.empty() ||
       std::memcmp(cur.val.data(), manifest.val.data(), cur.val.size() * sizeof(float)) == 0))
    return;  // the same bits: every prior computed with it still holds
  cur = manifest;
  ++manifests_gen_;
}

Status Learner::Score(const std::vector<SparseVector>& tasks,
                      const std::vector<ExpertProfile>& experts, std::vector<float>* out,
                      std::string* version) {
  std::lock_guard<std::mutex> l(mu_);
  const uint32_t mask = static_cast<uint32_t>(live_.rows() - 1);
  std::vector<std::string> names;
  std::vector<size_t> sizes;
  names.reserve(experts.size());
  for (const auto& e : experts) {
    names.push_back(e.name);
    size_t sig = e.manifest.size();  // size plus an index checksum: a replaced manifest
    for (uint32_t i : e.manifest.idx) sig = sig * 31 + i;
    sizes.push_back(sig);
  }
  if (names != prior_names_ || sizes != prior_sizes_) {
    prior_index_.clear();
    for (size_t e = 0; e < experts.size(); ++e) {
      const SparseVector& m = experts[e].manifest;
      PutManifest(experts[e].name, m);
      for (size_t k = 0; k < m.size(); ++k)
        prior_index_[m.idx[k]].emplace_back(static_cast<int>(e), m.val[k]);
    }
    prior_names_ = names;
    prior_sizes_ = sizes;
  }
  const size_t E = experts.size();
  SparseBatch x;
  std::vector<float> prior(tasks.size() * E, 0.0f);
  for (size_t b = 0; b < tasks.size(); ++b) {
    x.Add(tasks[b], mask);
    float* row = &prior[b * E];
    for (size_t k = 0; k < tasks[b].size(); ++k) {
      auto it = prior_index_.find(tasks[b].idx[k]);
      if (it == prior_index_.end()) continue;
      for (const auto& [e, w] : it->second) row[e] += tasks[b].val[k] * w;
    }
    for (size_t e = 0; e < E; ++e) row[e] = std::max(0.0f, row[e]);
  }
  *version = VersionName(version_);
  std::shared_lock<std::shared_mutex> weights(model_mu_);
  return score_engine_->Score(live_, x, names, prior, out);
}

float Learner::RewardOf(const LoggedOutcome& o) {
  return static_cast<float>(std::clamp(o.reward, 0.0, 1.0));
}

float Learner::WeightOf(const LoggedOutcome& o) const {
  // Only a first attempt's expert was drawn with the logged propensity; fallbacks and
  // forced choices were deterministic.
  const bool drawn = o.attempt == 1 && !o.forced && o.propensity > 0;
  return drawn ? std::min(options_.ips_clip, static_cast<float>(1.0 / o.propensity)) : 1.0f;
}

TrainSet Learner::MakeTrainSet(const std::vector<LoggedOutcome>& outcomes, size_t begin,
                               size_t end) {
  TrainSet set;
  std::map<std::string, int> cols;
  const uint32_t mask = static_cast<uint32_t>((size_t{1} << options_.shape.bits) - 1);
  std::vector<std::string> experts;
  for (size_t i = begin; i < end; ++i) experts.push_back(outcomes[i].expert);
  const std::map<std::string, SparseVector> manifests = ManifestsOf(experts);
  for (size_t i = begin; i < end; ++i) {
    const LoggedOutcome& o = outcomes[i];
    SparseVector v = hasher_.Task(o.text, o.tags);
    auto [it, added] = cols.emplace(o.expert, static_cast<int>(set.experts.size()));
    if (added) set.experts.push_back(o.expert);
    TrainRow r;
    r.x = set.x.rows();
    r.expert = it->second;
    r.prior = PriorOf(manifests, v, o.expert);
    r.reward = RewardOf(o);
    r.weight = WeightOf(o);
    set.x.Add(v, mask);
    set.rows.push_back(r);
  }
  return set;
}

void Learner::AddOnlineRow(OnlineRow& row) {
  TrainSet& set = online_set_;
  int col = 0;  // columns in order of first appearance, as MakeTrainSet numbers them
  while (col < static_cast<int>(set.experts.size()) && set.experts[col] != row.expert) ++col;
  if (col == static_cast<int>(set.experts.size())) set.experts.push_back(row.expert);
  TrainRow r;
  r.x = set.x.rows();
  r.expert = col;
  // The prior with the manifests of now: computed again only when they have changed since.
  if (row.prior_gen != manifests_gen_) {
    row.prior = PriorOf(manifests_, row.x, row.expert);
    row.prior_gen = manifests_gen_;
  }
  r.prior = row.prior;
  r.reward = row.reward;
  r.weight = row.weight;
  set.x.Add(row.x, static_cast<uint32_t>((size_t{1} << options_.shape.bits) - 1));
  set.rows.push_back(r);
}

void Learner::Observe(const LoggedOutcome& o) {
  if (!options_.online_updates) return;
  std::lock_guard<std::mutex> one(observe_mu_);
  ObserveLocked(o);
}

void Learner::ObserveLocked(const LoggedOutcome& o) {
  if (!options_.online_updates) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (o.seq <= trained_through_) return;
  }
  // Featurized once, outside the lock (scoring waits on it), and kept in that form for
  // replay; the check above spares hashing an outcome already learned from.
  OnlineRow row{hasher_.Task(o.text, o.tags), o.expert, RewardOf(o), WeightOf(o)};
  std::unique_lock<std::mutex> l(mu_);
  if (o.seq <= trained_through_) return;
  // The new outcome plus a few recent ones drawn at random (seeded): each online step
  // revisits the recent past, which learns faster than a single pass. Rows in the order
  // MakeTrainSet would give them over the drawn outcomes followed by the new one.
  online_set_.x.offsets.assign(1, 0);
  online_set_.x.idx.clear();
  online_set_.x.val.clear();
  online_set_.experts.clear();
  online_set_.rows.clear();
  for (int k = 0; k < options_.online_replay && !recent_.empty(); ++k) {
    replay_rng_ =
        replay_rng_ * 6364136223846793005ULL + 1442695040888963407ULL + options_.shape.seed;
    AddOnlineRow(recent_[(replay_rng_ >> 33) % recent_.size()]);
  }
  AddOnlineRow(row);
  if (static_cast<int>(recent_.size()) < options_.replay_buffer)
    recent_.push_back(std::move(row));
  else if (options_.replay_buffer > 0)
    recent_[recent_next_++ % recent_.size()] = std::move(row);
  l.unlock();
  TrainOptions step = options_.online;
  step.lock = &model_mu_;
  (void)online_engine_->Train(&live_, online_set_, step);
  l.lock();
  trained_through_ = o.seq;
}

void Learner::Install(GatingModel model, int version, long trained_through,
                      const std::vector<LoggedOutcome>& newer) {
  std::lock_guard<std::mutex> one(observe_mu_);
  {
    std::lock_guard<std::mutex> l(mu_);
    std::unique_lock<std::shared_mutex> weights(model_mu_);
    live_ = std::move(model);
    version_ = version;
    trained_through_ = trained_through;
    live_cutoff_ = trained_through;
  }
  for (const auto& o : newer)
    if (o.seq > trained_through) ObserveLocked(o);
}

GatingModel Learner::Snapshot() const {
  std::lock_guard<std::mutex> l(mu_);
  std::shared_lock<std::shared_mutex> weights(model_mu_);
  return live_;
}

Result<RetrainResult> Learner::Retrain(const std::vector<LoggedOutcome>& history, int version,
                                       double now,
                                       const std::function<void(const std::string&)>& progress) {
  std::lock_guard<std::mutex> one_at_a_time(train_mu_);
  const auto t0 = std::chrono::steady_clock::now();
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  RetrainResult res;
  const size_t n = history.size();
  const size_t holdout = std::min<size_t>(
      options_.max_holdout, static_cast<size_t>(std::llround(n * options_.holdout_fraction)));
  const size_t split = n - holdout;
  const size_t begin =
      split > static_cast<size_t>(options_.max_examples) ? split - options_.max_examples : 0;
  if (split == 0) return Status::FailedPrecondition("no logged outcomes to train on");

  auto cancelled = [&] { return options_.train.cancel && options_.train.cancel->load(); };
  say("featurizing " + std::to_string(split - begin) + " outcomes");
  TrainSet set = MakeTrainSet(history, begin, split);
  if (cancelled()) return Status::Unavailable("training was cancelled");
  res.train_rows = static_cast<long>(set.rows.size());
  res.model = GatingModel(options_.shape);
  say("training on " + train_engine_->backend() + ", " + std::to_string(options_.train.epochs) +
      " epochs");
  CORTEX_RETURN_IF_ERROR(train_engine_->Train(&res.model, set, options_.train));

  // Off-policy validation on the held-out, most recent decisions: the candidate's greedy
  // policy against the live model's greedy policy as it is now, both estimated doubly
  // robustly with the candidate as reward model (it never saw these rows), paired per
  // decision. Not against the logged greedy choices: those are the live model as it was
  // when each decision was made, and it has learned online since, so a candidate that beat
  // them was often worse than the model it replaced (on replay, such promotions cost online
  // success). With online updates on, the live model has learned from these outcomes, so
  // the comparison leans towards keeping it: a candidate must do as well as a model that
  // has seen the holdout.
  if (cancelled()) return Status::Unavailable("training was cancelled");
  // Only first attempts of decisions the router made (not forced by a rule) are evidence
  // about the routing policy: the count said is the count used.
  std::vector<size_t> eval;
  for (size_t i = split; i < n; ++i) {
    const LoggedOutcome& o = history[i];
    if (o.attempt == 1 && !o.forced && o.propensity > 0 && !o.candidates.empty()) eval.push_back(i);
  }
  say("validating on " + std::to_string(eval.size()) + " held-out decisions (the first attempts " +
      "among the " + std::to_string(holdout) + " newest outcomes)");
  std::set<std::string> name_set;
  for (size_t i : eval)
    for (const auto& [name, rule] : history[i].candidates) name_set.insert(name);
  std::vector<std::string> names(name_set.begin(), name_set.end());
  std::map<std::string, int> col;
  for (size_t e = 0; e < names.size(); ++e) col[names[e]] = static_cast<int>(e);
  SparseBatch x;
  std::vector<float> prior;
  const uint32_t mask = static_cast<uint32_t>(res.model.rows() - 1);
  const std::map<std::string, SparseVector> manifests = ManifestsOf(names);
  for (size_t i : eval) {
    SparseVector v = hasher_.Task(history[i].text, history[i].tags);
    x.Add(v, mask);
    for (const auto& name : names) prior.push_back(PriorOf(manifests, v, name));
  }
  std::vector<float> q, q_live;
  CORTEX_RETURN_IF_ERROR(train_engine_->Score(res.model, x, names, prior, &q));
  long live_cutoff;
  {
    {
      std::lock_guard<std::mutex> l(mu_);
      live_cutoff = live_cutoff_;
    }
    // Online steps wait for this (one batch of at most max_holdout rows), not the reverse.
    std::shared_lock<std::shared_mutex> weights(model_mu_);
    CORTEX_RETURN_IF_ERROR(train_engine_->Score(live_, x, names, prior, &q_live));
  }
  std::vector<double> dr_cand, dr_live, dr_diff;
  const size_t E = names.size();
  for (size_t k = 0; k < eval.size(); ++k) {
    const LoggedOutcome& o = history[eval[k]];
    auto qv = [&](const std::vector<float>& scores, const std::string& e) {
      auto it = col.find(e);
      return it == col.end() ? 0.0 : static_cast<double>(scores[k * E + it->second]);
    };
    // A model's greedy pick among the decision's candidates, rules included, as Route does.
    auto greedy = [&](const std::vector<float>& scores) {
      std::string best;
      double best_s = -1e300;
      for (const auto& [name, rule] : o.candidates) {
        double s = qv(scores, name) + rule;
        if (s > best_s || (s == best_s && name < best)) best_s = s, best = name;
      }
      return best;
    };
    const double correction = (o.reward - qv(q, o.expert)) / o.propensity;
    auto dr = [&](const std::string& a) { return qv(q, a) + (a == o.expert ? correction : 0.0); };
    dr_cand.push_back(dr(greedy(q)));
    dr_live.push_back(dr(greedy(q_live)));
    dr_diff.push_back(dr_cand.back() - dr_live.back());
  }
  res.holdout_rows = static_cast<long>(eval.size());
  res.candidate = MeanCi(dr_cand);
  res.live = MeanCi(dr_live);
  res.diff = MeanCi(dr_diff);
  // A doubly robust estimate can leave the reward range on few rows (the correction term
  // divides by the propensity); a policy's value cannot, so it is shown clipped to [0,1]
  // (the decision uses the unclipped difference).
  const bool clipped = res.candidate.value < 0 || res.candidate.value > 1 || res.live.value < 0 ||
                       res.live.value > 1;
  const PolicyEstimate raw_candidate = res.candidate, raw_live = res.live;  // for the bounds
  res.candidate.value = std::clamp(res.candidate.value, 0.0, 1.0);
  res.live.value = std::clamp(res.live.value, 0.0, 1.0);
  // The live version is caught up with online steps on every outcome after its cutoff when
  // cortexd starts (or another node loads it). While candidates keep being refused that
  // cutoff stays put, so once outcomes older than this retrain's window (the newest
  // max_examples + max_holdout) lie after it, the candidate is promoted whatever its
  // estimate: a start then replays about a window (as a retrain reads) at most. (Without
  // online updates nothing is replayed.)
  const bool full_window =
      history.size() >= static_cast<size_t>(options_.max_examples) + options_.max_holdout;
  const bool stale =
      options_.online_updates && full_window && live_cutoff < history.front().seq - 1;
  if (eval.size() < kMinValidationDecisions) {
    res.reason = "too few held-out decisions to validate: " + std::to_string(eval.size()) +
                 ", at least " + std::to_string(kMinValidationDecisions) + " are needed";
  } else if (res.diff.value < -kNotWorseTolerance && !stale) {
    res.reason = "candidate estimated worse than the live policy";
  } else if (res.diff.value < -kNotWorseTolerance) {
    res.promoted = true;
    res.reason = "candidate estimated worse than the live policy, but the live version's cutoff (" +
                 std::to_string(live_cutoff) + ") is older than this retrain's outcomes (from " +
                 std::to_string(history.front().seq) +
                 "): promoted, so that catching up after a restart stays within that window";
  } else {
    res.promoted = true;
    res.reason = "candidate estimated not worse than the live policy";
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  ModelRecord& rec = res.record;
  rec.version = version;
  rec.created = now;
  rec.status = res.promoted ? "promoted" : "refused";
  rec.trained_through = history[split - 1].seq;
  nlohmann::json m = {{"train_rows", res.train_rows},
                      {"holdout_rows", res.holdout_rows},
                      {"estimator", "doubly robust, 95% interval"},
                      {"baseline", "the live model's greedy policy at validation"},
                      {"candidate", EstimateJson(raw_candidate, 0, 1)},
                      {"live", EstimateJson(raw_live, 0, 1)},
                      {"diff", EstimateJson(res.diff, -1, 1)},
                      {"promoted", res.promoted},
                      {"reason", res.reason},
                      {"min_holdout_rows", kMinValidationDecisions},
                      {"clipped", clipped},
                      {"backend", train_engine_->backend()},
                      {"epochs", options_.train.epochs},
                      {"seconds", res.seconds},
                      {"live_version_at_training", live_version()},
                      {"live_cutoff", live_cutoff}};
  rec.metrics = m.dump();
  say(res.reason);
  return res;
}

Result<std::unique_ptr<GatingEngine>> MakeEngine(const std::string& backend, std::string* why) {
  if (backend == "cpu") {
    *why = "configured";
    return MakeCpuEngine();
  }
  auto cuda = MakeCudaEngine();
  if (cuda.ok()) {
    *why = backend == "cuda" ? "configured" : "auto: a working GPU was found";
    return std::move(cuda).value();
  }
  if (backend == "cuda")
    return Status::FailedPrecondition("router.backend: cuda: " + cuda.status().message());
  *why = "auto: " + cuda.status().message();
  return MakeCpuEngine();
}

namespace {

class GatingScorer : public Scorer {
 public:
  explicit GatingScorer(std::shared_ptr<Learner> l) : learner_(std::move(l)) {}
  std::string version() const override { return Learner::VersionName(learner_->live_version()); }
  std::string backend() const override { return learner_->backend(); }
  Status Score(const std::vector<SparseVector>& tasks, const std::vector<ExpertProfile>& experts,
               std::vector<float>* scores, std::string* version) override {
    return learner_->Score(tasks, experts, scores, version);
  }

 private:
  std::shared_ptr<Learner> learner_;
};

}  // namespace

std::unique_ptr<Scorer> MakeGatingScorer(std::shared_ptr<Learner> learner) {
  return std::make_unique<GatingScorer>(std::move(learner));
}

}  // namespace cortex
