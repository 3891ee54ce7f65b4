#include "cortex/learner.h"

#include "cortex/estimators.h"
#include "cortex/population.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace cortex {
namespace {

// Fit: a validation slice smaller than this says too little to choose passes by.
constexpr size_t kMinFitValidationRows = 100;
// Fit: a pass counts as better only when it lowers the held-out loss by more than this
// share, so that engines which differ in the last bits (CPU, CUDA) choose the same count.
constexpr double kFitMinImprovement = 1e-4;

// Rows [begin, end) of `s` with the task vectors they use.
TrainSet SliceRows(const TrainSet& s, size_t begin, size_t end) {
  TrainSet out;
  out.experts = s.experts;
  std::map<int, int> xrow;  // row of s.x -> row of out.x
  for (size_t i = begin; i < end; ++i) {
    TrainRow r = s.rows[i];
    auto [it, added] = xrow.emplace(r.x, out.x.rows());
    if (added) {
      for (int j = s.x.offsets[r.x]; j < s.x.offsets[r.x + 1]; ++j) {
        out.x.idx.push_back(s.x.idx[j]);
        out.x.val.push_back(s.x.val[j]);
      }
      out.x.offsets.push_back(static_cast<int>(out.x.idx.size()));
    }
    r.x = it->second;
    out.rows.push_back(r);
  }
  return out;
}

// What training on a set can change in a model, saved so that it can be put back: the Emb
// rows and wide entries the set's rows index (each row's gradient reaches no others), the
// heads and the small parameters, with their Adagrad state. A fraction of a whole copy
// (tens of MB, most of a small retrain's time in page faults).
class Undo {
 public:
  Undo(const GatingModel& m, const TrainSet& set)
      : heads_(m.heads),
        g_heads_(m.g_heads),
        b1_(m.b1),
        g_b1_(m.g_b1),
        prior_{m.prior_w, m.prior_b, m.g_prior_w, m.g_prior_b} {
    const uint32_t mask = static_cast<uint32_t>(m.rows() - 1);
    const size_t H = static_cast<size_t>(m.hidden());
    std::vector<uint64_t> keys;
    for (const auto& e : set.experts) keys.push_back(GatingModel::ExpertKey(e));
    std::vector<uint8_t> row_seen(m.rows(), 0), wide_seen(m.wide_size(), 0);
    for (const TrainRow& r : set.rows)
      for (int j = set.x.offsets[r.x]; j < set.x.offsets[r.x + 1]; ++j) {
        const uint32_t i = set.x.idx[j] & mask;
        if (!row_seen[i]) {
          row_seen[i] = 1;
          rows_.push_back(i);
          emb_.insert(emb_.end(), m.emb.begin() + i * H, m.emb.begin() + (i + 1) * H);
          g_emb_.insert(g_emb_.end(), m.g_emb.begin() + i * H, m.g_emb.begin() + (i + 1) * H);
        }
        const size_t w = m.WideIndex(i, keys[static_cast<size_t>(r.expert)]);
        if (!wide_seen[w]) {
          wide_seen[w] = 1;
          wide_.push_back({w, m.wide[w], m.g_wide[w]});
        }
      }
  }
  void Restore(GatingModel* m) const {
    const size_t H = static_cast<size_t>(m->hidden());
    for (size_t k = 0; k < rows_.size(); ++k) {
      std::copy_n(emb_.begin() + k * H, H, m->emb.begin() + rows_[k] * H);
      std::copy_n(g_emb_.begin() + k * H, H, m->g_emb.begin() + rows_[k] * H);
    }
    for (const Wide& w : wide_) {
      m->wide[w.index] = w.value;
      m->g_wide[w.index] = w.acc;
    }
    m->heads = heads_;
    m->g_heads = g_heads_;
    m->b1 = b1_;
    m->g_b1 = g_b1_;
    m->prior_w = prior_[0];
    m->prior_b = prior_[1];
    m->g_prior_w = prior_[2];
    m->g_prior_b = prior_[3];
    m->stamp = GatingModel::NextStamp();
  }

 private:
  struct Wide {
    size_t index;
    float value, acc;
  };
  std::map<std::string, ExpertHead> heads_;
  std::map<std::string, std::vector<float>> g_heads_;
  std::vector<float> b1_, g_b1_;
  float prior_[4];
  std::vector<uint32_t> rows_;
  std::vector<float> emb_, g_emb_;
  std::vector<Wide> wide_;
};

// The weighted log loss of `m`'s reward estimates on the rows of `s`.
Result<double> HeldOutLoss(GatingEngine* engine, const GatingModel& m, const TrainSet& s) {
  const size_t E = s.experts.size();
  std::vector<float> prior(static_cast<size_t>(s.x.rows()) * E, 0.0f), p;
  for (const TrainRow& r : s.rows) prior[static_cast<size_t>(r.x) * E + r.expert] = r.prior;
  CORTEX_RETURN_IF_ERROR(engine->Score(m, s.x, s.experts, prior, &p));
  double loss = 0, weight = 0;
  for (const TrainRow& r : s.rows) {
    const double q =
        std::clamp(static_cast<double>(p[static_cast<size_t>(r.x) * E + r.expert]), 1e-7, 1 - 1e-7);
    loss -= r.weight * (r.reward * std::log(q) + (1 - r.reward) * std::log(1 - q));
    weight += r.weight;
  }
  return weight > 0 ? loss / weight : 0.0;
}

}  // namespace

Learner::Learner(LearnerOptions options, FeatureHasher hasher,
                 std::unique_ptr<GatingEngine> score_engine,
                 std::unique_ptr<GatingEngine> train_engine)
    : options_(options),
      hasher_(hasher),
      score_engine_(std::move(score_engine)),
      train_engine_(std::move(train_engine)),
      online_engine_(MakeCpuEngine()) {
  live_.model = GatingModel(options.shape);
}

int Learner::live_version() const {
  std::shared_lock<std::shared_mutex> l(model_mu_);
  return live_.live.version;
}

long Learner::trained_through() const {
  std::shared_lock<std::shared_mutex> l(model_mu_);
  return live_.seq;
}

void Learner::LiveStep(Activation* live, long* step, long* seq) const {
  std::shared_lock<std::shared_mutex> l(model_mu_);
  *live = live_.live;
  *step = live_.step;
  *seq = live_.seq;
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
  manifests_[expert] = manifest;
}

Status Learner::Score(const std::vector<SparseVector>& tasks,
                      const std::vector<ExpertProfile>& experts, std::vector<float>* out,
                      ScoreInfo* info) {
  std::lock_guard<std::mutex> l(mu_);
  const uint32_t mask = static_cast<uint32_t>((size_t{1} << options_.shape.bits) - 1);
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
  std::vector<float>& prior = info->priors;
  prior.assign(tasks.size() * E, 0.0f);
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
  // The weights and the step that names them, read under one lock: a step in progress
  // is either all in the scores or not at all.
  std::shared_lock<std::shared_mutex> weights(model_mu_);
  info->version = VersionName(live_.live.version);
  info->live = live_.live.id;
  info->step = live_.step;
  return score_engine_->Score(live_.model, x, names, prior, out);
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

OnlineRow Learner::RowOf(const LoggedOutcome& o) const {
  // The prior recorded with the decision, not the manifests of now: a manifest edited
  // later must not change what replaying this step gives.
  return {hasher_.Task(o.text, o.tags),
          o.expert,
          RewardOf(o),
          o.feedback ? options_.feedback_weight : WeightOf(o),
          static_cast<float>(o.prior),
          o.task_id,
          o.attempt};
}

// A verdict changed an attempt's reward: the ring's earlier rows about that attempt (its
// outcome, earlier verdicts) replay with the reward it has now, or every replay of the
// outcome would teach the model back what the person corrected. `n` rows are looked at.
static void CorrectRing(std::vector<OnlineRow>* ring, size_t n, const OnlineRow& verdict) {
  for (size_t i = 0; i < n; ++i) {
    OnlineRow& r = (*ring)[i];
    if (r.attempt == verdict.attempt && r.task == verdict.task) r.reward = verdict.reward;
  }
}

void Learner::StepLocked(OnlineState* s, OnlineRow row, bool feedback, TrainSet* set,
                         GatingEngine* engine) const {
  // The new event plus a few from the ring drawn at random (seeded): each online step
  // revisits the recent past, which learns faster than a single pass.
  set->x.offsets.assign(1, 0);
  set->x.idx.clear();
  set->x.val.clear();
  set->experts.clear();
  set->rows.clear();
  const uint32_t mask = static_cast<uint32_t>((size_t{1} << options_.shape.bits) - 1);
  auto add = [&](const OnlineRow& r) {
    int col = 0;  // columns in order of first appearance
    while (col < static_cast<int>(set->experts.size()) && set->experts[col] != r.expert) ++col;
    if (col == static_cast<int>(set->experts.size())) set->experts.push_back(r.expert);
    set->rows.push_back({set->x.rows(), col, r.prior, r.reward, r.weight});
    set->x.Add(r.x, mask);
  };
  if (feedback) CorrectRing(&s->ring, s->ring.size(), row);
  for (int k = 0; k < options_.online_replay && !s->ring.empty(); ++k) {
    s->rng = s->rng * 6364136223846793005ULL + 1442695040888963407ULL + options_.shape.seed;
    add(s->ring[(s->rng >> 33) % s->ring.size()]);
  }
  add(row);
  const size_t cap = static_cast<size_t>(std::max(options_.replay_buffer, 0));
  if (cap > 0) {
    if (s->ring.size() < cap)
      s->ring.push_back(std::move(row));
    else
      s->ring[static_cast<size_t>(s->step) % cap] = std::move(row);
  }
  // What this step writes, for the next delta checkpoint.
  if (s->dirty_emb.size() != s->model.rows()) s->dirty_emb.assign(s->model.rows(), 0);
  if (s->dirty_wide.size() != s->model.wide_size()) s->dirty_wide.assign(s->model.wide_size(), 0);
  for (const TrainRow& r : set->rows) {
    const uint64_t key = GatingModel::ExpertKey(set->experts[static_cast<size_t>(r.expert)]);
    for (int j = set->x.offsets[r.x]; j < set->x.offsets[r.x + 1]; ++j) {
      s->dirty_emb[set->x.idx[j]] = 1;
      s->dirty_wide[s->model.WideIndex(set->x.idx[j], key)] = 1;
    }
  }
  TrainOptions step = options_.online;
  step.lock = nullptr;  // the caller holds the state's lock for the whole step
  (void)engine->Train(&s->model, *set, step);
  ++s->step;
}

void Learner::Observe(const LoggedOutcome& o) {
  if (!options_.online_updates) return;
  std::lock_guard<std::mutex> one(observe_mu_);
  {
    std::shared_lock<std::shared_mutex> l(model_mu_);
    if (o.seq <= live_.seq) return;
  }
  // Featurized outside the lock (scoring waits on it).
  OnlineRow row = RowOf(o);
  std::unique_lock<std::shared_mutex> l(model_mu_);
  StepLocked(&live_, std::move(row), o.feedback, &online_set_, online_engine_.get());
  live_.seq = o.seq;
}

OnlineState Learner::Begin(GatingModel model, const Activation& live) const {
  OnlineState s;
  s.model = std::move(model);
  s.live = live;
  s.seq = live.after_seq;
  return s;
}

Result<OnlineState> Learner::Resume(const Activation& live, const Checkpoint& c, GatingModel model,
                                    const std::vector<LoggedOutcome>& ring_events) const {
  OnlineState s = Begin(std::move(model), live);
  s.step = c.step;
  s.seq = c.seq;
  s.rng = c.rng;
  const long cap = std::max(options_.replay_buffer, 0);
  const long n = std::min<long>(c.step, cap);
  if (static_cast<long>(ring_events.size()) != n)
    return Status::Corruption("checkpoint at step " + std::to_string(c.step) + " needs " +
                              std::to_string(n) + " learning events before it, the store has " +
                              std::to_string(ring_events.size()));
  // In event order, each verdict correcting the rows before it, as the steps did.
  std::vector<OnlineRow> rows;
  rows.reserve(static_cast<size_t>(n));
  for (const LoggedOutcome& o : ring_events) {
    rows.push_back(RowOf(o));
    if (o.feedback) CorrectRing(&rows, rows.size() - 1, rows.back());
  }
  s.ring.resize(static_cast<size_t>(n));
  for (long i = 0; i < n; ++i) {  // event i is that of step c.step - n + 1 + i
    const long t = c.step - n + 1 + i;
    s.ring[static_cast<size_t>((t - 1) % cap)] = std::move(rows[static_cast<size_t>(i)]);
  }
  return s;
}

void Learner::Step(OnlineState* s, const LoggedOutcome& o) const {
  thread_local TrainSet set;  // scratch, and an engine, for a rebuild's many steps
  thread_local std::unique_ptr<GatingEngine> engine = MakeCpuEngine();
  StepLocked(s, RowOf(o), o.feedback, &set, engine.get());
  s->seq = o.seq;
}

void Learner::Install(GatingModel model, const Activation& live) {
  std::lock_guard<std::mutex> one(observe_mu_);
  std::unique_lock<std::shared_mutex> weights(model_mu_);
  live_ = Begin(std::move(model), live);
  live_cutoff_ = live.after_seq;
}

void Learner::Install(GatingModel model, int version, long trained_through,
                      const std::vector<LoggedOutcome>& newer) {
  Install(std::move(model), Activation{0, version, trained_through, 0, "installed"});
  for (const auto& o : newer) Observe(o);
}

void Learner::Restore(OnlineState state) {
  std::lock_guard<std::mutex> one(observe_mu_);
  std::unique_lock<std::shared_mutex> weights(model_mu_);
  // A newer activation was installed while this one was being rebuilt (a rollback while a
  // node reloaded the previous one): the newer stays. Activation ids only grow.
  if (state.live.id < live_.live.id) return;
  live_cutoff_ = state.live.after_seq;
  live_ = std::move(state);
}

GatingModel Learner::Snapshot() const {
  std::shared_lock<std::shared_mutex> weights(model_mu_);
  return live_.model;
}

Checkpoint Learner::MakeCheckpoint(long activation, long delta_base) {
  Checkpoint c;
  GatingModel copy;
  {
    // Exclusive: the copy (or delta) and the cleared flags are of one and the same step.
    std::unique_lock<std::shared_mutex> weights(model_mu_);
    c.activation = live_.live.id;
    if (c.activation != activation) return c;
    c.step = live_.step;
    c.seq = live_.seq;
    c.rng = live_.rng;
    if (delta_base >= 0) {
      // The flags are kept: every delta is on the whole checkpoint (a rebuild reads two).
      c.weights = live_.model.SerializeDelta(delta_base, live_.dirty_emb, live_.dirty_wide);
    } else {
      copy = live_.model;
      std::fill(live_.dirty_emb.begin(), live_.dirty_emb.end(), 0);
      std::fill(live_.dirty_wide.begin(), live_.dirty_wide.end(), 0);
    }
  }
  // A whole one is serialized outside the lock: it compares every row with its seed.
  if (delta_base < 0) c.weights = copy.Serialize();
  return c;
}

std::vector<ExplainedCandidate> Learner::Explain(
    const GatingModel& m, const std::string& text, const Tags& tags,
    const std::vector<std::pair<std::string, float>>& cands, size_t top) const {
  const SparseVector v = hasher_.Task(text, tags);
  const uint32_t mask = static_cast<uint32_t>(m.rows() - 1);
  SparseBatch x;
  x.Add(v, mask);
  std::vector<std::string> names;
  std::vector<float> prior;
  for (const auto& [e, p] : cands) names.push_back(e), prior.push_back(p);
  std::vector<float> scores;
  auto engine = MakeCpuEngine();
  (void)engine->Score(m, x, names, prior, &scores);
  // What each feature is: the words, pairs, 4-grams and tags that hash to its bucket.
  const auto labels = hasher_.Labels(text, tags);
  const int H = m.hidden();
  std::vector<float> h(m.b1.begin(), m.b1.end());
  for (size_t j = 0; j < v.size(); ++j) {
    const float* row = &m.emb[static_cast<size_t>(v.idx[j] & mask) * H];
    for (int c = 0; c < H; ++c) h[c] += v.val[j] * row[c];
  }
  std::vector<ExplainedCandidate> out;
  for (size_t e = 0; e < names.size(); ++e) {
    ExplainedCandidate ec;
    ec.expert = names[e];
    ec.model_score = scores.empty() ? 0.0 : scores[e];
    ec.prior_part = static_cast<double>(m.prior_w) * prior[e] + m.prior_b;
    const ExpertHead* head = m.Head(names[e]);
    const uint64_t key = GatingModel::ExpertKey(names[e]);
    for (size_t j = 0; j < v.size(); ++j) {
      const uint32_t i = v.idx[j] & mask;
      double c = static_cast<double>(v.val[j]) * m.wide[m.WideIndex(i, key)];
      if (head) {  // the hidden layer with and without this feature
        const float* row = &m.emb[static_cast<size_t>(i) * H];
        for (int k = 0; k < H; ++k)
          c += head->w[k] * (std::tanh(static_cast<double>(h[k])) -
                             std::tanh(static_cast<double>(h[k]) - v.val[j] * row[k]));
      }
      auto it = labels.find(v.idx[j]);
      ec.features.emplace_back(it == labels.end() ? "#" + std::to_string(v.idx[j]) : it->second, c);
    }
    std::stable_sort(ec.features.begin(), ec.features.end(), [](const auto& a, const auto& b) {
      return std::fabs(a.second) > std::fabs(b.second);
    });
    if (ec.features.size() > top) ec.features.resize(top);
    out.push_back(std::move(ec));
  }
  return out;
}

Status Learner::Fit(GatingModel* m, const TrainSet& set, FitReport* report) {
  std::lock_guard<std::mutex> one_at_a_time(train_mu_);
  return FitLocked(m, set, options_.train, report);
}

Status Learner::FitLocked(GatingModel* m, const TrainSet& set, const TrainOptions& opt,
                          FitReport* report) {
  FitReport local;
  FitReport& rep = report ? *report : local;
  rep = FitReport();
  const size_t n = set.rows.size();
  const size_t held = static_cast<size_t>(
      std::floor(static_cast<double>(n) * std::clamp(options_.validation_fraction, 0.0, 0.5)));
  if (held < kMinFitValidationRows || opt.epochs <= 1) {
    rep.epochs = opt.epochs;
    return train_engine_->Train(m, set, opt);
  }
  // Passes on the older rows, one call each so the slice is scored after each; the
  // orders are those one call would have used (first_epoch).
  const TrainSet fit = SliceRows(set, 0, n - held), check = SliceRows(set, n - held, n);
  const Undo undo(*m, fit);
  rep.validation_rows = static_cast<int>(held);
  double best = 0;
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    TrainOptions one = opt;
    one.epochs = 1;
    one.first_epoch = opt.first_epoch + epoch;
    CORTEX_RETURN_IF_ERROR(train_engine_->Train(m, fit, one));
    Result<double> held_loss = HeldOutLoss(train_engine_.get(), *m, check);
    if (!held_loss.ok()) return held_loss.status();
    const double loss = held_loss.value();
    rep.validation_loss.push_back(loss);
    if (epoch > 0 && !(loss < best * (1 - kFitMinImprovement))) break;
    best = loss;
    rep.epochs = epoch + 1;
  }
  // The newest rows are the most telling of what comes next (the stream drifts), so the
  // model kept is not the one that never saw them: a fresh start makes the chosen count of
  // passes on every row.
  undo.Restore(m);
  TrainOptions all = opt;
  all.epochs = rep.epochs;
  return train_engine_->Train(m, set, all);
}

Result<std::vector<std::string>> Learner::CandidatePicks(
    const GatingModel& model, long trained_through, const std::vector<LoggedOutcome>& history,
    size_t split, const std::vector<size_t>& decisions, const std::atomic<bool>* cancel) const {
  OnlineState s = Begin(model, Activation{0, 0, trained_through, 0, "candidate"});
  // Each decision alone on the CPU, with the priors it recorded: the bits Route gave.
  auto engine = MakeCpuEngine();
  const uint32_t mask = static_cast<uint32_t>(model.rows() - 1);
  std::vector<std::string> picks, names;
  std::vector<float> prior, scores;
  picks.reserve(decisions.size());
  size_t k = 0;
  for (size_t i = split; i < history.size(); ++i) {
    if ((i - split) % 256 == 255 && cancel && cancel->load())
      return Status::Unavailable("training was cancelled");
    const LoggedOutcome& o = history[i];
    if (k < decisions.size() && decisions[k] == i) {
      SparseBatch x;
      x.Add(hasher_.Task(o.text, o.tags), mask);
      names.clear();
      prior.clear();
      for (const auto& c : o.candidates)
        names.push_back(c.expert), prior.push_back(static_cast<float>(c.prior));
      CORTEX_RETURN_IF_ERROR(engine->Score(s.model, x, names, prior, &scores));
      picks.push_back(o.candidates[GreedyPick(o.candidates, scores)].expert);
      ++k;
    }
    if (options_.online_updates) Step(&s, o);
  }
  return picks;
}

Result<RetrainResult> Learner::Retrain(const std::vector<LoggedOutcome>& history, int version,
                                       double now,
                                       const std::function<void(const std::string&)>& progress,
                                       WarmStart warm) {
  std::lock_guard<std::mutex> one_at_a_time(train_mu_);
  const auto t0 = std::chrono::steady_clock::now();
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  auto cancelled = [&] { return options_.train.cancel && options_.train.cancel->load(); };
  RetrainResult res;

  // Split.
  const RetrainSplit sp = SplitOutcomes(history.size(), options_.holdout_fraction,
                                        static_cast<size_t>(std::max(options_.max_holdout, 0)),
                                        static_cast<size_t>(std::max(options_.max_examples, 0)));
  if (sp.split == 0) return Status::FailedPrecondition("no logged outcomes to train on");
  const long trained_through = history[sp.split - 1].seq;

  // Fit.
  say("featurizing " + std::to_string(sp.split - sp.begin) + " outcomes");
  TrainSet set = MakeTrainSet(history, sp.begin, sp.split);
  if (cancelled()) return Status::Unavailable("training was cancelled");
  res.train_rows = static_cast<long>(set.rows.size());
  // Estimate (for each variant fitted): against what the live system did on the held-out
  // decisions, never against the live model as it is now (it has learned from them online,
  // so it nearly always won).
  res.decisions = HeldOutDecisions(history, sp.split);
  const double clip = options_.ips_clip;
  const std::vector<Variant> variants = PopulationVariants(options_.population);
  std::vector<GateEstimate> estimates(variants.size());
  std::vector<std::vector<std::string>> all_picks(variants.size());
  say("training on " + train_engine_->backend() + ", at most " +
      std::to_string(options_.train.epochs) + " epochs" +
      (variants.size() > 1 ? ", a population of " + std::to_string(variants.size()) + " candidates"
                           : std::string()));
  std::vector<VariantFit> judged;
  for (const Variant& v : variants) {
    RetrainResult::Fitted f;
    f.variant = v.name;
    GatingModel m(options_.shape);
    if (v.warm) {
      // Its weights learned from events up to its cutoff: judged on the validation slice
      // only when that slice is newer, else the choice would flatter it.
      const GatingShape& a = warm.model ? warm.model->shape() : options_.shape;
      if (!warm.model || a.bits != options_.shape.bits || a.hidden != options_.shape.hidden ||
          a.wide_bits != options_.shape.wide_bits) {
        f.why_not = warm.model ? "the live version has another shape"
                               : "no saved live version to start from";
        say("  " + v.name + ": not fitted (" + f.why_not + ")");
        res.population.push_back(std::move(f));
        judged.push_back({});
        continue;
      }
      m = *warm.model;
    }
    CORTEX_RETURN_IF_ERROR(FitLocked(&m, set, VariantOptions(options_.train, v), &f.fit));
    if (cancelled()) return Status::Unavailable("training was cancelled");
    const size_t held = static_cast<size_t>(f.fit.validation_rows);
    if (held == 0) {
      f.why_not = "too few training rows for a validation slice";
    } else if (v.warm && warm.trained_through >= history[sp.split - held].seq) {
      f.why_not = "the live version learned from part of the validation slice";
    } else {
      f.eligible = true;
    }
    judged.push_back({f.eligible, f.eligible ? f.fit.validation_loss[f.fit.epochs - 1] : 0.0});
    // Each variant's gate estimate is reported; only the one kept by validation loss is
    // judged by it (the best of several estimates on one holdout would flatter itself).
    const size_t k = res.population.size();
    auto picks =
        CandidatePicks(m, trained_through, history, sp.split, res.decisions, options_.train.cancel);
    if (!picks.ok()) return picks.status();
    all_picks[k] = std::move(picks).value();
    estimates[k] = EstimateAgainstLogged(history, res.decisions, all_picks[k], clip);
    f.diff = estimates[k].diff.value;
    f.estimated = true;
    if (variants.size() > 1)
      say("  " + v.name + ": " + std::to_string(f.fit.epochs) + " pass(es)" +
          (f.eligible ? ", validation loss " + std::to_string(judged.back().loss)
                      : " (not judged: " + f.why_not + ")") +
          ", estimated " + std::to_string(f.diff) + " against the live system");
    res.population.push_back(std::move(f));
    if (res.population.size() == 1 || ChooseVariant(judged) == judged.size() - 1)
      res.model = std::move(m);
  }
  res.chosen = ChooseVariant(judged);
  res.fit = res.population[res.chosen].fit;
  if (variants.size() > 1) say("kept the " + res.population[res.chosen].variant + " candidate");
  say("validating on " + std::to_string(res.decisions.size()) +
      " held-out decisions (the first attempts among the " + std::to_string(sp.end - sp.split) +
      " newest outcomes)" +
      (options_.online_updates ? ", the candidate stepping online through them" : ""));

  const GateEstimate est = estimates[res.chosen];
  res.picks = std::move(all_picks[res.chosen]);

  // Decide.
  long live_cutoff;
  {
    std::shared_lock<std::shared_mutex> l(model_mu_);
    live_cutoff = live_cutoff_;
  }
  GateInputs in;
  in.decisions = res.decisions.size();
  in.diff = est.diff.value;
  in.online_updates = options_.online_updates;
  in.full_window =
      history.size() >= static_cast<size_t>(options_.max_examples) + options_.max_holdout;
  in.live_cutoff = live_cutoff;
  in.first_seq = history.front().seq;
  const GateVerdict verdict = DecidePromotion(in);

  // Record.
  res.holdout_rows = static_cast<long>(res.decisions.size());
  res.candidate = est.candidate;
  res.live = est.live;
  res.diff = est.diff;
  res.candidate.value = std::clamp(res.candidate.value, 0.0, 1.0);
  res.live.value = std::clamp(res.live.value, 0.0, 1.0);
  res.agreement = est.agreement;
  res.promoted = verdict.promoted;
  res.reason = verdict.reason;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ModelRecord& rec = res.record;
  rec.version = version;
  rec.created = now;
  rec.status = res.promoted ? "promoted" : "refused";
  rec.trained_through = trained_through;
  RetrainFacts f;
  f.train_rows = res.train_rows;
  f.holdout_rows = res.holdout_rows;
  f.estimate = est;
  f.verdict = verdict;
  f.progressive = options_.online_updates;
  f.clip = clip;
  f.backend = train_engine_->backend();
  f.epochs = res.fit.epochs;
  f.max_epochs = options_.train.epochs;
  f.fit_validation_rows = res.fit.validation_rows;
  f.fit_validation_loss = res.fit.validation_loss;
  f.seconds = res.seconds;
  // judged[i] holds variant i's validation loss as the choice read it (0: not judged).
  for (size_t i = 0; i < res.population.size(); ++i) {
    const auto& p = res.population[i];
    f.population.push_back(
        {p.variant, p.fit.epochs, judged[i].loss, p.eligible, p.why_not, p.estimated, p.diff});
  }
  f.chosen = res.chosen;
  f.live_version = live_version();
  f.live_cutoff = live_cutoff;
  rec.metrics = RetrainMetrics(f);
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
               std::vector<float>* scores, ScoreInfo* info) override {
    return learner_->Score(tasks, experts, scores, info);
  }

 private:
  std::shared_ptr<Learner> learner_;
};

}  // namespace

std::unique_ptr<Scorer> MakeGatingScorer(std::shared_ptr<Learner> learner) {
  return std::make_unique<GatingScorer>(std::move(learner));
}

}  // namespace cortex
