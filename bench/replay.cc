// cortex-bench replay: a real task stream through the real Router and Learner, in time order,
// with simulated experts that succeed exactly when they are the task's mapped label. The
// router never sees the label; it learns only from the chosen expert's outcome, retraining
// on the daemon's cadence (training.interval on the corpus clock, training.min_new_outcomes).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include <unistd.h>

#include "bench.h"
#include "cortex/config.h"
#include "cortex/html_page.h"
#include "cortex/learner.h"
#include "cortex/router.h"

namespace cortex::bench {
namespace {

struct Row {
  std::string id;
  double time = 0;
  std::string text;
  std::string label;  // expert name
};

// The corpus README's mapping; style and revert are dropped.
const std::map<std::string, std::string>& LabelMap() {
  static const std::map<std::string, std::string> k = {
      {"fix", "bugfix"},       {"feat", "feature"},      {"docs", "docs"},
      {"build", "cicd"},       {"ci", "cicd"},           {"test", "testing"},
      {"perf", "performance"}, {"refactor", "refactor"}, {"chore", "maintenance"}};
  return k;
}

// Generic manifests, written from the role of each expert (not from any corpus): what a
// plugin author would put in its manifest.
std::vector<ManifestText> SimulatedExperts() {
  return {
      {"bugfix",
       "Diagnoses and fixes bugs: errors, crashes, regressions, wrong behaviour",
       {"fix", "bug", "error", "crash", "regression", "broken", "incorrect", "fails"},
       {"fix crash when the config file is missing", "handle null values correctly"}},
      {"feature",
       "Implements new features, options and capabilities",
       {"feature", "add", "support", "new", "implement", "introduce", "allow", "option"},
       {"add support for custom themes", "allow users to configure the timeout"}},
      {"docs",
       "Writes and corrects documentation, guides, comments and changelogs",
       {"docs", "documentation", "readme", "guide", "typo", "comment", "changelog", "example"},
       {"document the new option in the readme", "fix typo in the guide"}},
      {"cicd",
       "Build system, packaging, dependencies, release and CI pipelines",
       {"build", "ci", "pipeline", "workflow", "release", "package", "dependency", "bump"},
       {"bump dependency versions", "run the test workflow on pull requests"}},
      {"testing",
       "Writes and repairs automated tests",
       {"test", "tests", "spec", "coverage", "unit", "e2e", "flaky", "mock"},
       {"add unit tests for the parser", "fix flaky e2e test"}},
      {"performance",
       "Makes code faster or leaner",
       {"performance", "perf", "faster", "speed", "optimize", "memory", "cache", "slow"},
       {"avoid repeated allocations in the hot loop", "cache computed results"}},
      {"refactor",
       "Restructures code without changing behaviour",
       {"refactor", "cleanup", "simplify", "rename", "restructure", "move", "extract", "reuse"},
       {"extract helper into its own module", "simplify the resolver logic"}},
      {"maintenance",
       "Routine upkeep: chores, tooling, configuration and housekeeping",
       {"chore", "maintenance", "update", "upgrade", "lint", "format", "tooling", "config"},
       {"update lint configuration", "remove unused files"}},
  };
}

Result<std::vector<Row>> ReadCorpus(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot read corpus " + path);
  std::vector<Row> rows;
  std::string line;
  std::getline(in, line);  // header
  long lineno = 1;
  while (std::getline(in, line)) {
    ++lineno;
    std::vector<std::string> cols;
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, '\t')) cols.push_back(c);
    if (cols.size() < 5)
      return Status::InvalidArgument(path + ":" + std::to_string(lineno) + ": expected 5 columns");
    auto it = LabelMap().find(cols[2]);
    if (it == LabelMap().end()) continue;
    Row r;
    r.id = cols[0];
    r.time = std::strtod(cols[1].c_str(), nullptr);
    r.text = cols[4];
    r.label = it->second;
    rows.push_back(std::move(r));
  }
  return rows;
}

// The outcome of trying candidate `c` on row `r`: success exactly when it is the label.
LoggedOutcome OutcomeOf(const Row& r, const Candidate& c, long seq) {
  LoggedOutcome o;
  o.seq = seq;
  o.task_id = r.id;
  o.time = r.time;
  o.text = r.text;
  o.expert = c.expert;
  o.reward = c.expert == r.label ? 1.0 : 0.0;
  o.prior = c.prior;
  return o;
}

struct Policy {
  std::shared_ptr<Learner> learner;
  std::unique_ptr<Router> router;
};

Policy MakePolicy(const Config& cfg, const LearnerOptions& lo, uint64_t seed) {
  Policy p;
  p.learner =
      std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), MakeCpuEngine(), MakeCpuEngine());
  RouterOptions ro;
  ro.exploration = cfg.router.exploration;
  ro.load_bias = cfg.router.load_bias;
  ro.seed = seed;
  p.router = std::make_unique<Router>(ro, RuleSet::Compile(cfg.rules, "replay").value(),
                                      MakeGatingScorer(p.learner), FeatureHasher(lo.shape.bits));
  return p;
}

// Whether `p`'s greedy choice is right, for each of rows [begin, end).
std::vector<int> GreedyHits(Policy& p, const std::vector<Row>& rows, size_t begin, size_t end,
                            const std::vector<ExpertSlot>& slots) {
  std::vector<int> hits;
  const size_t chunk = 256;
  for (size_t b = begin; b < end; b += chunk) {
    std::vector<RouteRequest> reqs;
    for (size_t i = b; i < std::min(end, b + chunk); ++i) reqs.push_back({rows[i].text, {}});
    std::vector<Decision> ds;
    if (!p.router->Route(reqs, slots, false, 0, &ds).ok()) ds.clear();
    for (size_t k = 0; k < reqs.size(); ++k)
      hits.push_back(k < ds.size() && ds[k].chosen == rows[b + k].label);
  }
  return hits;
}

// Greedy success rate of `p` on rows [begin, end).
double GreedyRate(Policy& p, const std::vector<Row>& rows, size_t begin, size_t end,
                  const std::vector<ExpertSlot>& slots) {
  const std::vector<int> hits = GreedyHits(p, rows, begin, end, slots);
  long ok = 0;
  for (int h : hits) ok += h;
  return end > begin ? static_cast<double>(ok) / static_cast<double>(end - begin) : 0;
}

// The page's series: success over the trailing `window` tasks at ~200 points along the
// stream (online, the rules+prior policy, the running majority), each expert's share of
// the online choices there, and where retrains happened.
nlohmann::json Curves(const std::vector<int>& online, const std::vector<int>& prior,
                      const std::vector<int>& majority, const std::vector<std::string>& chosen,
                      const std::vector<std::string>& experts) {
  const size_t N = online.size();
  const size_t window = std::max<size_t>(50, N / 50), points = std::min<size_t>(200, N);
  nlohmann::json at = nlohmann::json::array(), on = at, pr = at, mj = at;
  std::map<std::string, nlohmann::json> share;
  for (const auto& e : experts) share[e] = nlohmann::json::array();
  for (size_t p = 1; p <= points; ++p) {
    const size_t end = N * p / points, begin = end > window ? end - window : 0;
    double o = 0, r = 0, m = 0;
    std::map<std::string, long> by;
    for (size_t i = begin; i < end; ++i)
      o += online[i], r += prior[i], m += majority[i], ++by[chosen[i]];
    const double n = static_cast<double>(end - begin);
    at.push_back(end);
    on.push_back(o / n);
    pr.push_back(r / n);
    mj.push_back(m / n);
    for (auto& [e, v] : share) v.push_back(by[e] / n);
  }
  return {{"window", window}, {"at", at},       {"online", on},
          {"prior", pr},      {"majority", mj}, {"share", share}};
}

}  // namespace

int Replay(const ReplayOptions& opt) {
  auto corpus = ReadCorpus(opt.corpus);
  if (!corpus.ok()) {
    std::fprintf(stderr, "cortex-bench: %s\n", corpus.status().message().c_str());
    return 1;
  }
  const std::vector<Row>& rows = corpus.value();
  const size_t N = rows.size();
  if (N < 100) {
    std::fprintf(stderr, "cortex-bench: corpus too small (%zu usable rows)\n", N);
    return 1;
  }
  Config cfg = DefaultConfig();
  if (!opt.config.empty()) {
    auto c = LoadConfigFile(opt.config);
    if (!c.ok()) {
      std::fprintf(stderr, "cortex-bench: %s\n", c.status().message().c_str());
      return 2;
    }
    cfg = std::move(c).value();
  }
  LearnerOptions lo = opt.learner;
  lo.online_updates = lo.online_updates && cfg.training.online;
  const size_t split80 = N * 8 / 10;
  const size_t late_at = opt.late_expert.empty() ? 0 : static_cast<size_t>(opt.late_at * N);

  // Experts (the late one withheld until its time).
  FeatureHasher hasher(lo.shape.bits);
  std::vector<ExpertSlot> all;
  for (const auto& m : SimulatedExperts()) all.push_back({{m.name, hasher.Manifest(m)}, 0.0});
  bool late_known = opt.late_expert.empty();
  for (const auto& s : all) late_known |= s.profile.name == opt.late_expert;
  if (!late_known) {
    std::fprintf(stderr, "cortex-bench: --late-expert %s is not one of the simulated experts\n",
                 opt.late_expert.c_str());
    return 2;
  }
  auto slots_at = [&](size_t i) {
    std::vector<ExpertSlot> s;
    for (const auto& e : all)
      if (e.profile.name != opt.late_expert || i >= late_at) s.push_back(e);
    return s;
  };

  Policy live = MakePolicy(cfg, lo, opt.seed);
  RetrainSchedule schedule(cfg.training.interval_s, cfg.training.min_new_outcomes);
  std::vector<LoggedOutcome> history;
  long online_ok = 0, retrains = 0, promotions = 0, new_outcomes = 0;
  long seq = 0, fallbacks = 0, fallback_ok = 0, explored = 0;
  const int max_attempts = opt.max_attempts > 0 ? opt.max_attempts : cfg.router.max_attempts;
  std::vector<int> to_late(N, 0), success_at(N, 0);
  std::vector<std::string> chosen_at(N);
  nlohmann::json retrain_marks = nlohmann::json::array();
  double train_seconds = 0;
  // Progress on a terminal: the replay of a large corpus takes minutes.
  const bool tty = isatty(2);
  auto progress = [&](size_t done) {  // over the tasks replayed so far
    if (tty)
      std::fprintf(stderr, "\r  replay: %zu/%zu tasks, %ld retrains, online success %.3f ", done, N,
                   retrains, done ? static_cast<double>(online_ok) / done : 0.0);
  };
  // The bandit's ceiling: the same learner, online, told every expert's reward after
  // each greedy pick (progressive validation: each task is scored before it is learned).
  Policy oracle = MakePolicy(cfg, lo, opt.seed);
  long oracle_ok = 0, oracle_seq = 0;
  std::optional<GatingModel> live_base;  // the live version's saved weights (none for v0)
  long live_base_through = 0;
  std::map<std::string, long> kept;  // population: how often each variant was kept
  double policy20 = 0, retrain20 = 0;
  FitReport retrain_fit;
  std::map<std::string, std::string> label_of;  // task id -> label, for the gate's check
  long gate_checked = 0, truly_better = 0, promoted_truly_better = 0;
  double gate_error = 0, gate_abs_error = 0;
  for (size_t i = 0; i < N; ++i) {
    if (i % 500 == 0) progress(i);
    const Row& r = rows[i];
    label_of[r.id] = r.label;
    // The policy figure: the greedy policy of the model as it is at the 80% point, on the
    // last 20%, which it has not learned from (Route without exploration draws nothing,
    // so the run goes on as if it had not been asked).
    if (i == split80) {
      policy20 = GreedyRate(live, rows, split80, N, slots_at(N));
      // The batch trainer on what the router logged (one expert's outcome per decision,
      // importance-weighted), as a retrain uses it, at the same point: what a retrain
      // could promote, out of sample.
      Policy cand = MakePolicy(cfg, lo, opt.seed);
      for (const auto& e : all) cand.learner->SetManifest(e.profile.name, e.profile.manifest);
      const size_t from = history.size() > static_cast<size_t>(lo.max_examples)
                              ? history.size() - lo.max_examples
                              : 0;
      TrainSet set = cand.learner->MakeTrainSet(history, from, history.size());
      GatingModel m(lo.shape);
      (void)cand.learner->Fit(&m, set, &retrain_fit);
      cand.learner->Install(std::move(m), 1, history.back().seq, {});
      retrain20 = GreedyRate(cand, rows, split80, N, slots_at(N));
    }
    std::vector<Decision> ds;
    std::vector<ExpertSlot> slots = slots_at(i);
    Status st = live.router->Route({{r.text, {}}}, slots, true, r.time, &ds);
    if (!st.ok()) {
      std::fprintf(stderr, "cortex-bench: route: %s\n", st.message().c_str());
      return 1;
    }
    const Decision& d = ds[0];
    const bool success = d.chosen == r.label;
    {
      std::vector<Decision> od;
      if (!oracle.router->Route({{r.text, {}}}, slots, false, r.time, &od).ok() || od.empty()) {
        std::fprintf(stderr, "cortex-bench: route (full information)\n");
        return 1;
      }
      oracle_ok += od[0].chosen == r.label;
      for (const auto& c : od[0].candidates) {
        if (c.model_score == 0 && c.confidence == 0) continue;  // forced, not loaded
        LoggedOutcome f = OutcomeOf(r, c, ++oracle_seq);
        f.forced = true;  // weight 1: no propensity to correct for
        oracle.learner->Observe(f);
      }
    }
    online_ok += success;
    explored += d.explored;
    success_at[i] = success;
    chosen_at[i] = d.chosen;
    to_late[i] = d.chosen == opt.late_expert;
    LoggedOutcome o = OutcomeOf(r, d.candidates.front(), ++seq);  // the chosen one leads
    o.propensity = d.propensity;
    o.forced = d.forced;
    for (const auto& c : d.candidates)
      o.candidates.push_back({c.expert, c.rule_score, c.model_score, c.prior});
    o.greedy = d.greedy;
    live.learner->Observe(o);
    history.push_back(o);
    ++new_outcomes;
    // As cortexd does: a failed first attempt falls back to the decision's next candidate
    // (not for a forced decision), up to router.max_attempts. Its outcome is feedback on
    // another expert (logged as attempt 2, propensity 1); online success counts first
    // attempts only.
    for (int a = 2; !success && !d.forced && a <= max_attempts &&
                    static_cast<size_t>(a) <= d.candidates.size();
         ++a) {
      LoggedOutcome f = o;
      f.seq = ++seq;
      f.attempt = a;
      f.expert = d.candidates[a - 1].expert;
      f.prior = d.candidates[a - 1].prior;
      f.reward = f.expert == r.label ? 1.0 : 0.0;
      f.propensity = 1.0;
      ++fallbacks;
      fallback_ok += f.reward > 0;
      live.learner->Observe(f);
      history.push_back(f);
      ++new_outcomes;
      if (f.reward > 0) break;
    }
    if (schedule.Due(new_outcomes, r.time)) {
      schedule.Done(r.time);
      new_outcomes = 0;
      WarmStart warm;
      if (live_base) warm = {&*live_base, live_base_through};
      auto res = live.learner->Retrain(history, static_cast<int>(retrains) + 1, r.time, {}, warm);
      ++retrains;
      if (!res.ok()) {
        std::fprintf(stderr, "cortex-bench: retrain: %s\n", res.status().message().c_str());
        return 1;
      }
      train_seconds += res->seconds;
      if (res->chosen < res->population.size()) ++kept[res->population[res->chosen].variant];
      retrain_marks.push_back(
          {{"task", i + 1}, {"version", res->record.version}, {"promoted", res->promoted}});
      // The gate's estimate beside the truth, which the replay knows (each task's label):
      // the candidate's picks against the live system's on the held-out decisions.
      std::vector<double> truth;
      for (size_t k = 0; k < res->decisions.size(); ++k) {
        const LoggedOutcome& o = history[res->decisions[k]];
        const std::string& label = label_of[o.task_id];
        truth.push_back((res->picks[k] == label) - (o.greedy == label) + 0.0);
      }
      const PolicyEstimate t = MeanCi(truth);
      if (truth.size() >= kMinGateDecisions) {
        ++gate_checked;
        gate_error += res->diff.value - t.value;
        gate_abs_error += std::fabs(res->diff.value - t.value);
        truly_better += t.value > 0;
        promoted_truly_better += res->promoted && t.value > 0;
      }
      if (opt.verbose)
        std::fprintf(stderr,
                     "  [%zu] v%d: %s (cand %.3f live %.3f diff %+.4f±%.4f, same picks %.3f; "
                     "true diff %+.4f)\n",
                     i + 1, res->record.version, res->promoted ? "promoted" : "refused",
                     res->candidate.value, res->live.value, res->diff.value, res->diff.ci,
                     res->agreement, t.value);
      if (res->promoted) {
        ++promotions;
        std::vector<LoggedOutcome> newer;
        for (const auto& h : history)
          if (h.seq > res->record.trained_through) newer.push_back(h);
        live_base = res->model;  // its saved weights: the next warm start (population)
        live_base_through = res->record.trained_through;
        live.learner->Install(std::move(res->model), res->record.version,
                              res->record.trained_through, newer);
      }
    }
  }
  progress(N);
  if (tty) std::fprintf(stderr, "\n");
  const double online = static_cast<double>(online_ok) / N;
  std::vector<double> deciles;
  for (int k = 0; k < 10; ++k) {
    size_t a = N * k / 10, b = N * (k + 1) / 10;
    long ok = 0;
    for (size_t i = a; i < b; ++i) ok += success_at[i];
    deciles.push_back(static_cast<double>(ok) / static_cast<double>(b - a));
  }

  // Baselines, in the same run.
  std::map<std::string, long> counts;
  for (size_t i = 0; i < split80; ++i) ++counts[rows[i].label];
  std::string majority;
  for (const auto& [k, v] : counts)
    if (majority.empty() || v > counts[majority]) majority = k;
  long maj_ok = 0;
  for (size_t i = split80; i < N; ++i) maj_ok += rows[i].label == majority;
  const double majority20 = static_cast<double>(maj_ok) / (N - split80);
  Policy prior = MakePolicy(cfg, lo, opt.seed);
  const double prior20 = GreedyRate(prior, rows, split80, N, slots_at(N));
  // Full information: every expert's reward known for the first 80%.
  Policy full = MakePolicy(cfg, lo, opt.seed);
  FitReport full_fit;
  {
    std::vector<LoggedOutcome> labelled;
    for (size_t i = 0; i < split80; ++i)
      for (const auto& e : all) {
        LoggedOutcome o;
        o.seq = static_cast<long>(labelled.size()) + 1;
        o.text = rows[i].text;
        o.expert = e.profile.name;
        o.reward = e.profile.name == rows[i].label;
        o.forced = true;  // weight 1: no propensity to correct for
        labelled.push_back(std::move(o));
      }
    for (const auto& e : all) full.learner->SetManifest(e.profile.name, e.profile.manifest);
    TrainSet set = full.learner->MakeTrainSet(labelled, 0, labelled.size());
    GatingModel m(lo.shape);
    (void)full.learner->Fit(&m, set, &full_fit);  // the retrains' trainer, as they use it
    full.learner->Install(std::move(m), 1, static_cast<long>(labelled.size()), {});
  }
  const double full20 = GreedyRate(full, rows, split80, N, slots_at(N));

  nlohmann::json j = {{"corpus", opt.corpus},
                      {"rows", N},
                      {"online_success", online},
                      {"policy_last20", policy20},
                      {"retrain_last20", retrain20},
                      {"retrain_epochs", retrain_fit.epochs},
                      {"population", lo.population},
                      {"population_kept", kept},
                      {"baselines",
                       {{"majority_last20", majority20},
                        {"majority_expert", majority},
                        {"prior_last20", prior20},
                        {"full_info_last20", full20},
                        {"full_info_epochs", full_fit.epochs},
                        {"full_info_online", static_cast<double>(oracle_ok) / N}}},
                      {"online_success_by_decile", deciles},
                      {"retrains", retrains},
                      {"max_attempts", max_attempts},
                      {"fallbacks", fallbacks},
                      {"fallback_successes", fallback_ok},
                      {"explored", explored},
                      {"promotions", promotions},
                      // The gate against the truth on its own held-out decisions: how many
                      // candidates were better than the live system there, how many of
                      // those it promoted, and its estimate's mean (signed) error.
                      {"gate",
                       {{"retrains_estimated", gate_checked},
                        {"truly_better", truly_better},
                        {"promoted_truly_better", promoted_truly_better},
                        {"mean_error", gate_checked ? gate_error / gate_checked : 0.0},
                        {"mean_abs_error", gate_checked ? gate_abs_error / gate_checked : 0.0}}},
                      {"live_version", live.learner->live_version()},
                      {"train_seconds", train_seconds},
                      {"exploration", cfg.router.exploration},
                      {"training",
                       {{"interval_s", cfg.training.interval_s},
                        {"min_new_outcomes", cfg.training.min_new_outcomes}}}};
  std::printf("replay %s: %zu tasks, %ld retrains (%ld promoted, live v%d)\n", opt.corpus.c_str(),
              N, retrains, promotions, live.learner->live_version());
  std::printf(
      "  gate: %ld of %ld estimated candidates truly better on their held-out decisions, %ld of "
      "those promoted; estimate error %+.4f (mean), %.4f (mean absolute)\n",
      truly_better, gate_checked, promoted_truly_better,
      gate_checked ? gate_error / gate_checked : 0.0,
      gate_checked ? gate_abs_error / gate_checked : 0.0);
  std::printf("  online success (exploration included): %.3f\n", online);
  std::printf("  explored first attempts: %ld (%.4f of tasks; router.exploration %.3f)\n", explored,
              static_cast<double>(explored) / N, cfg.router.exploration);
  std::printf("  fallbacks (max_attempts %d): %ld, %ld succeeded (not counted above)\n",
              max_attempts, fallbacks, fallback_ok);
  std::printf("  by tenth of the stream:");
  for (double d : deciles) std::printf(" %.3f", d);
  std::printf("\n");
  std::printf("  greedy policy at the 80%% point, on the last 20%% (out of sample): %.3f\n",
              policy20);
  std::printf(
      "  a retrain at the 80%% point on the logged outcomes, on the last 20%%: %.3f (%d epochs)\n",
      retrain20, retrain_fit.epochs);
  std::printf(
      "  baselines, last 20%%: majority (%s) %.3f, rules+prior %.3f, full-information %.3f\n",
      majority.c_str(), majority20, prior20, full20);
  std::printf("  full information online (every reward known, progressive validation): %.3f\n",
              static_cast<double>(oracle_ok) / N);
  if (!opt.late_expert.empty()) {
    double final_share = 0;
    for (size_t i = split80; i < N; ++i) final_share += to_late[i];
    final_share /= (N - split80);
    const size_t W = 100;
    long tasks_to = -1;
    for (size_t k = W; late_at + k <= N; ++k) {
      double s = 0;
      for (size_t i = late_at + k - W; i < late_at + k; ++i) s += to_late[i];
      if (s / W >= 0.8 * final_share) {
        tasks_to = static_cast<long>(k);
        break;
      }
    }
    j["late_expert"] = {
        {"name", opt.late_expert},    {"at", opt.late_at}, {"introduced_at_task", late_at},
        {"final_share", final_share}, {"window", W},       {"tasks_to_80pct", tasks_to}};
    std::printf(
        "  late expert %s from task %zu: final share %.3f, 80%% of it reached after %ld tasks"
        " (rolling window of %zu)\n",
        opt.late_expert.c_str(), late_at, final_share, tasks_to, W);
  }
  if (!opt.html_out.empty()) {
    // The baselines along the whole stream: rules+prior as it routes each task (the
    // experts there at the time), and the majority label of the tasks before each one.
    std::vector<int> prior_hits = GreedyHits(prior, rows, 0, late_at, slots_at(0));
    for (int h : GreedyHits(prior, rows, late_at, N, slots_at(N))) prior_hits.push_back(h);
    std::vector<int> majority_hits;
    std::map<std::string, long> seen;
    std::string leader;
    for (const Row& r : rows) {
      majority_hits.push_back(!leader.empty() && r.label == leader);
      if (++seen[r.label] > (leader.empty() ? 0 : seen[leader])) leader = r.label;
    }
    std::vector<std::string> names;
    for (const auto& e : all) names.push_back(e.profile.name);
    nlohmann::json page = j;
    page["curve"] = Curves(success_at, prior_hits, majority_hits, chosen_at, names);
    page["retrain_marks"] = retrain_marks;
    page["split80"] = split80;
    const std::string title =
        "Cortex replay: " + std::filesystem::path(opt.corpus).filename().string();
    if (Status st =
            html::WritePage(opt.html_out, html::ChartPage(html::Page::kReplay, title, page));
        !st.ok()) {
      std::fprintf(stderr, "cortex-bench: %s\n", st.message().c_str());
      return 1;
    }
    std::printf("  page: %s\n", opt.html_out.c_str());
  }
  WriteJson(opt.json_out, j);
  return 0;
}

}  // namespace cortex::bench
