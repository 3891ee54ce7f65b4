// cortex-bench score / train: routing throughput, single-decision latency and training
// throughput of the gating model on the CPU or CUDA engine.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "bench.h"
#include "cortex/population.h"
#include "cortex/router.h"

namespace cortex::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Task-like sentences from a small vocabulary (the figures do not depend on meaning).
class Sentences {
 public:
  explicit Sentences(uint32_t seed) : rng_(seed) {}
  std::string Make(int n) {
    static const char* words[] = {
        "fix",     "login",    "bug",     "add",      "feature",  "docs",   "update",   "build",
        "release", "refactor", "parser",  "test",     "flaky",    "perf",   "cache",    "security",
        "token",   "deps",     "bump",    "ci",       "pipeline", "render", "compiler", "hydration",
        "types",   "ssr",      "runtime", "reactive", "template", "warning"};
    std::string s;
    for (int i = 0; i < n; ++i) s += std::string(i ? " " : "") + words[rng_() % 30];
    return s;
  }

 private:
  std::mt19937 rng_;
};

Result<std::unique_ptr<GatingEngine>> Engine(const std::string& backend) {
  std::string why;
  return MakeEngine(backend, &why);
}

std::vector<ExpertSlot> MakeExperts(int n, const FeatureHasher& h, Sentences* s) {
  std::vector<ExpertSlot> slots;
  for (int e = 0; e < n; ++e) {
    const std::string name = "expert" + std::to_string(e);
    slots.push_back(
        {{name,
          h.Manifest(
              {name, s->Make(12), {s->Make(1), s->Make(1), s->Make(2)}, {s->Make(6), s->Make(6)}})},
         0.0});
  }
  return slots;
}

// A learner whose model has trained heads for every expert (the cost is the same either
// way, but this is the shape a running daemon scores with).
std::shared_ptr<Learner> TrainedLearner(std::unique_ptr<GatingEngine> engine,
                                        const std::vector<ExpertSlot>& experts, Sentences* s) {
  LearnerOptions lo;
  auto learner = std::make_shared<Learner>(lo, FeatureHasher(lo.shape.bits), std::move(engine),
                                           MakeCpuEngine());
  std::vector<LoggedOutcome> logged;
  for (int i = 0; i < 2000; ++i) {
    LoggedOutcome o;
    o.seq = i + 1;
    o.text = s->Make(7);
    o.expert = experts[i % experts.size()].profile.name;
    o.reward = (i / 3) % 2;
    o.propensity = 0.9;
    logged.push_back(o);
  }
  for (const auto& e : experts) learner->SetManifest(e.profile.name, e.profile.manifest);
  TrainSet set = learner->MakeTrainSet(logged, 0, logged.size());
  GatingModel m(lo.shape);
  (void)MakeCpuEngine()->Train(&m, set, lo.train);
  learner->Install(std::move(m), 1, static_cast<long>(logged.size()), {});
  return learner;
}

}  // namespace

int Score(const SpeedOptions& opt) {
  auto engine = Engine(opt.backend);
  if (!engine.ok()) {
    std::fprintf(stderr, "cortex-bench: %s\n", engine.status().message().c_str());
    return 1;
  }
  const std::string backend = engine.value()->backend();
  Sentences s(7);
  LearnerOptions lo;
  FeatureHasher hasher(lo.shape.bits);
  std::vector<ExpertSlot> slots = MakeExperts(opt.experts, hasher, &s);
  auto learner = TrainedLearner(std::move(engine).value(), slots, &s);
  Router router(RouterOptions{}, RuleSet(), MakeGatingScorer(learner), hasher);

  nlohmann::json rows = nlohmann::json::array();
  std::vector<int> batches = opt.batches;
  if (batches.empty()) batches = {opt.batch};
  for (int batch : batches) {
    std::vector<RouteRequest> reqs;
    for (int i = 0; i < batch; ++i) reqs.push_back({s.Make(7), {}});
    std::vector<Decision> out;
    (void)router.Route(reqs, slots, true, 0, &out);  // warm-up (device upload, buffers)
    // End to end: text -> features -> model -> decisions.
    const int rounds = std::max(1, opt.min_tasks / batch);
    auto t0 = Clock::now();
    for (int r = 0; r < rounds; ++r) (void)router.Route(reqs, slots, true, 0, &out);
    const double route_rate = static_cast<double>(batch) * rounds / Seconds(t0);
    // The model alone on pre-computed features: the part a GPU accelerates.
    std::vector<SparseVector> feats;
    for (const auto& r : reqs) feats.push_back(hasher.Task(r.text, r.tags));
    std::vector<ExpertProfile> profiles;
    for (const auto& e : slots) profiles.push_back(e.profile);
    std::vector<float> scores;
    ScoreInfo info;
    t0 = Clock::now();
    for (int r = 0; r < rounds; ++r) (void)learner->Score(feats, profiles, &scores, &info);
    const double model_rate = static_cast<double>(batch) * rounds / Seconds(t0);
    rows.push_back(
        {{"batch", batch}, {"route_tasks_per_s", route_rate}, {"model_tasks_per_s", model_rate}});
    std::printf(
        "score (%s): %d experts, batch %6d: %10.0f tasks/s end to end, %10.0f tasks/s "
        "model only\n",
        backend.c_str(), opt.experts, batch, route_rate, model_rate);
  }
  // Single decisions, one task at a time, as a live daemon with one client sees them.
  std::vector<double> single;
  std::vector<Decision> out;
  for (int i = 0; i < 5000; ++i) {
    std::vector<RouteRequest> one = {{s.Make(7), {}}};
    auto t0 = Clock::now();
    (void)router.Route(one, slots, true, 0, &out);
    single.push_back(Seconds(t0) * 1e6);
  }
  nlohmann::json j = {{"backend", backend},
                      {"experts", opt.experts},
                      {"batches", rows},
                      {"single_p50_us", Percentile(single, 0.5)},
                      {"single_p99_us", Percentile(single, 0.99)}};
  std::printf("score (%s): single decision p50 %.1f us, p99 %.1f us\n", backend.c_str(),
              Percentile(single, 0.5), Percentile(single, 0.99));
  if (backend.rfind("cuda", 0) == 0) {
    auto g = CudaGemmProbe(65536, lo.shape.hidden, opt.experts);
    if (g.ok()) {
      j["gemm"] = {{"ours_gflops", g->ours_gflops},
                   {"ours_gbytes_per_s", g->ours_gbytes},
                   {"peak_sgemm_gflops", g->peak_gflops},
                   {"shape", g->shape}};
      std::printf(
          "gemm: ours %s %.0f GFLOP/s (%.0f GB/s); cuBLAS SGEMM 8192^3 on this card %.0f "
          "GFLOP/s\n",
          g->shape.c_str(), g->ours_gflops, g->ours_gbytes, g->peak_gflops);
    }
  }
  WriteJson(opt.json_out, j);
  return 0;
}

int Train(const SpeedOptions& opt) {
  auto engine = Engine(opt.backend);
  if (!engine.ok()) {
    std::fprintf(stderr, "cortex-bench: %s\n", engine.status().message().c_str());
    return 1;
  }
  const std::string backend = engine.value()->backend();
  Sentences s(11);
  LearnerOptions lo;
  FeatureHasher hasher(lo.shape.bits);
  std::vector<ExpertSlot> slots = MakeExperts(opt.experts, hasher, &s);
  Learner learner(lo, hasher, MakeCpuEngine(), MakeCpuEngine());
  for (const auto& e : slots) learner.SetManifest(e.profile.name, e.profile.manifest);
  std::vector<LoggedOutcome> logged;
  std::mt19937 rng(3);
  for (int i = 0; i < opt.examples; ++i) {
    LoggedOutcome o;
    o.seq = i + 1;
    o.text = s.Make(7);
    o.expert = slots[rng() % slots.size()].profile.name;
    o.reward = rng() % 2;
    o.propensity = 0.9;
    logged.push_back(std::move(o));
  }
  auto t0 = Clock::now();
  TrainSet set = learner.MakeTrainSet(logged, 0, logged.size());
  const double featurize_s = Seconds(t0);
  nlohmann::json rows = nlohmann::json::array();
  std::vector<int> batches = opt.batches;
  if (batches.empty()) batches = {lo.train.batch};
  for (int batch : batches) {
    TrainOptions to = lo.train;
    to.epochs = opt.epochs;
    to.batch = batch;
    GatingModel m(lo.shape);
    t0 = Clock::now();
    Status st = engine.value()->Train(&m, set, to);
    const double secs = Seconds(t0);
    if (!st.ok()) {
      std::fprintf(stderr, "cortex-bench: %s\n", st.message().c_str());
      return 1;
    }
    const double rate = static_cast<double>(opt.examples) * opt.epochs / secs;
    rows.push_back({{"batch", batch}, {"outcomes_per_s_per_epoch", rate}, {"seconds", secs}});
    std::printf("train (%s): %d outcomes x %d epochs, minibatch %5d: %10.0f outcomes/s per epoch\n",
                backend.c_str(), opt.examples, opt.epochs, batch, rate);
  }
  std::printf("train: featurizing %d outcomes took %.3fs (%.0f/s, once per retrain)\n",
              opt.examples, featurize_s, opt.examples / featurize_s);
  // The online step cortexd's trainer takes per logged outcome (on the CPU, with the
  // default replay of recent outcomes), one outcome at a time as they arrive.
  t0 = Clock::now();
  for (const auto& o : logged) learner.Observe(o);
  const double online_s = Seconds(t0);
  std::printf("train: online steps over %d outcomes took %.3fs (%.1f us each, %d replayed)\n",
              opt.examples, online_s, online_s * 1e6 / opt.examples, lo.online_replay);
  nlohmann::json out = {{"backend", backend},
                        {"examples", opt.examples},
                        {"epochs", opt.epochs},
                        {"batches", rows},
                        {"featurize_per_s", opt.examples / featurize_s},
                        {"online_step_us", online_s * 1e6 / opt.examples}};
  if (opt.population > 0) {
    // A retrain's population (population.h): each variant fitted as Learner::Fit does
    // (passes chosen on the newest tenth, then that many on all rows), one after another
    // on this engine; the warm one starts from the first one's weights. The engines are
    // made before the clock starts (a CUDA context takes a while).
    std::vector<std::unique_ptr<Learner>> fitters;
    for (const Variant& v : PopulationVariants(opt.population)) {
      auto e = Engine(opt.backend);
      if (!e.ok()) {
        std::fprintf(stderr, "cortex-bench: %s\n", e.status().message().c_str());
        return 1;
      }
      LearnerOptions vo = lo;
      vo.train = VariantOptions(lo.train, v);
      vo.train.epochs = opt.epochs;
      fitters.push_back(
          std::make_unique<Learner>(vo, hasher, MakeCpuEngine(), std::move(e).value()));
    }
    const std::vector<Variant> variants = PopulationVariants(opt.population);
    GatingModel first(lo.shape);
    t0 = Clock::now();
    for (size_t k = 0; k < variants.size(); ++k) {
      GatingModel m = variants[k].warm ? first : GatingModel(lo.shape);
      FitReport rep;
      if (Status st = fitters[k]->Fit(&m, set, &rep); !st.ok()) {
        std::fprintf(stderr, "cortex-bench: %s\n", st.message().c_str());
        return 1;
      }
      if (k == 0) first = std::move(m);
    }
    const double secs = Seconds(t0);
    const double rate = static_cast<double>(variants.size()) / secs;
    std::printf(
        "train: a population of %zu candidates (%s) on %d outcomes, at most %d passes "
        "each: %.3fs, %.2f candidates/s\n",
        variants.size(), backend.c_str(), opt.examples, opt.epochs, secs, rate);
    out["population"] = {{"candidates", variants.size()},
                         {"seconds", secs},
                         {"candidates_per_s", rate},
                         {"one_after_another", true}};
  }
  WriteJson(opt.json_out, out);
  return 0;
}

}  // namespace cortex::bench
