// cortex-bench as a user runs it: replay's accounting on a corpus whose answers we know,
// and soak's against its own cortexd with misbehaving experts.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <sstream>

#include "testutil.h"

namespace cortex {
namespace {

using test::json;
using test::TempDir;
namespace fs = std::filesystem;

// Each label has its own words, so a learner can reach near-perfect accuracy, and the
// majority label's share of the last 20% is known exactly.
std::string Corpus(int rows, int* fix_last20) {
  const std::vector<std::pair<std::string, std::string>> kinds = {
      {"fix", "crash null pointer wrong value"},
      {"docs", "readme guide typo wording"},
      {"perf", "faster allocation cache speed"}};
  std::mt19937 rng(4);
  std::string s = "id\tunix_time\ttype\tscope\ttext\n";
  *fix_last20 = 0;
  for (int i = 0; i < rows; ++i) {
    // 60% fix, 20% docs, 20% perf.
    int k = (rng() % 10) < 6 ? 0 : 1 + static_cast<int>(rng() % 2);
    std::string words = kinds[k].second;
    std::string text;
    for (int w = 0; w < 4; ++w) {
      size_t a = 0, n = rng() % 4;
      for (size_t j = 0; j < n; ++j) a = words.find(' ', a) + 1;
      text += words.substr(a, words.find(' ', a) - a) + " ";
    }
    text += "module" + std::to_string(rng() % 50);
    s += "abc" + std::to_string(i) + "\t" + std::to_string(1600000000 + i * 3600) + "\t" +
         kinds[k].first + "\tcore\t" + text + "\n";
    if (i >= rows - rows / 5) *fix_last20 += k == 0;
    if (i % 50 == 0) s += "zz" + std::to_string(i) + "\t1600000000\tstyle\t\tformat code\n";
  }
  return s;
}

TEST(Replay, ReportsOnlinePolicyAndBaselinesOnAKnownCorpus) {
  TempDir dir;
  int fix_last20;
  const std::string corpus = dir / "c.tsv";
  test::WriteFile(corpus, Corpus(1000, &fix_last20));
  const std::string out = dir / "r.json";
  test::Run r = test::RunCmd(
      {test::BinDir() + "/cortex-bench", "replay", "--corpus", corpus, "--json", out}, 120);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("online success"), std::string::npos) << r.out;
  json j = json::parse(test::ReadFile(out));
  EXPECT_EQ(j["rows"], 1000);  // style rows are dropped
  EXPECT_DOUBLE_EQ(j["baselines"]["majority_last20"].get<double>(), fix_last20 / 200.0);
  EXPECT_EQ(j["baselines"]["majority_expert"], "bugfix");
  for (const char* k : {"prior_last20", "full_info_last20"}) {
    double v = j["baselines"][k].get<double>();
    EXPECT_GE(v, 0);
    EXPECT_LE(v, 1);
  }
  // Separable labels: the ceiling and the learned policy are both near perfect, and the
  // online figure (exploration included) is well above the majority.
  EXPECT_GT(j["baselines"]["full_info_last20"].get<double>(), 0.95);
  EXPECT_GT(j["baselines"]["full_info_online"].get<double>(), 0.9);
  EXPECT_LE(j["baselines"]["full_info_online"].get<double>(), 1.0);
  EXPECT_GT(j["policy_last20"].get<double>(), 0.95);
  EXPECT_GT(j["online_success"].get<double>(), 0.8);
  // Exploration follows the model's doubt: it never stops (the replay logs every draw), but
  // once the model is sure of its picks it explores well under router.exploration (0.05).
  const long explored = j["explored"].get<long>();
  EXPECT_GT(explored, 0) << r.out;
  EXPECT_LT(explored, 0.05 * 1000 / 2) << r.out;
  EXPECT_GE(j["retrains"].get<int>(), 1);
  EXPECT_EQ(j["online_success_by_decile"].size(), 10u);
}

// The policy figure is out of sample: the model as it was at the 80% point. Here the
// last 20% relabels every task (what was a fix is now docs): the model learns it online
// (the last tenth's online success is high), but the policy frozen at 80% cannot know it.
TEST(Replay, ThePolicyFigureIsTheModelAtTheEightyPercentPoint) {
  TempDir dir;
  std::string s = "id\ttime\ttype\tscope\ttext\n";
  const int rows = 1000;
  for (int i = 0; i < rows; ++i)
    s += "t" + std::to_string(i) + "\t" + std::to_string(1600000000 + i * 3600) + "\t" +
         (i < rows * 8 / 10 ? "fix" : "docs") + "\t\tcrash in parser module" +
         std::to_string(i % 7) + "\n";
  const std::string corpus = dir / "c.tsv", out = dir / "r.json";
  test::WriteFile(corpus, s);
  test::Run r = test::RunCmd(
      {test::BinDir() + "/cortex-bench", "replay", "--corpus", corpus, "--json", out}, 120);
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(test::ReadFile(out));
  EXPECT_LT(j["policy_last20"].get<double>(), 0.05) << r.out;
  EXPECT_GT(j["online_success_by_decile"][9].get<double>(), 0.5) << r.out;
}

// As cortexd does, a failed first attempt falls back to the next candidate; only first
// attempts count as online success, and --max-attempts 1 turns fallbacks off.
TEST(Replay, FallsBackAsTheDaemonDoes) {
  TempDir dir;
  int unused;
  const std::string corpus = dir / "c.tsv";
  test::WriteFile(corpus, Corpus(1000, &unused));
  // Exploring often: first attempts that fail, whatever the model has learned.
  const std::string config = dir / "cortex.yaml";
  test::WriteFile(config, "router:\n  exploration: 0.5\n");
  for (const char* attempts : {"1", "2"}) {
    const std::string out = dir / (std::string("r") + attempts + ".json");
    test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", "replay", "--corpus", corpus,
                                "--config", config, "--max-attempts", attempts, "--json", out},
                               120);
    ASSERT_EQ(r.code, 0) << r.err;
    json j = json::parse(test::ReadFile(out));
    EXPECT_EQ(j["max_attempts"], std::stoi(attempts));
    const long fallbacks = j["fallbacks"].get<long>(), ok = j["fallback_successes"].get<long>();
    const long first_failures = std::lround(1000 * (1 - j["online_success"].get<double>()));
    if (std::string(attempts) == "1") {
      EXPECT_EQ(fallbacks, 0);
    } else {
      EXPECT_GT(first_failures, 0);
      EXPECT_EQ(fallbacks, first_failures);  // one per failed first attempt
      EXPECT_GT(ok, 0);
      EXPECT_LE(ok, fallbacks);
    }
  }
}

TEST(Replay, LateExpertIsCountedFromItsArrival) {
  TempDir dir;
  int unused;
  const std::string corpus = dir / "c.tsv";
  test::WriteFile(corpus, Corpus(1000, &unused));
  const std::string out = dir / "r.json";
  test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", "replay", "--corpus", corpus,
                              "--late-expert", "docs", "--at", "0.4", "--json", out},
                             120);
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(test::ReadFile(out));
  EXPECT_EQ(j["late_expert"]["name"], "docs");
  EXPECT_EQ(j["late_expert"]["introduced_at_task"], 400);
  EXPECT_GT(j["late_expert"]["final_share"].get<double>(), 0.1);
  const long n = j["late_expert"]["tasks_to_80pct"].get<long>();
  EXPECT_GE(n, 100);  // the rolling window's length is the least it can report
  EXPECT_LE(n, 500);

  r = test::RunCmd(
      {test::BinDir() + "/cortex-bench", "replay", "--corpus", corpus, "--late-expert", "nobody"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("not one of the simulated experts"), std::string::npos) << r.err;
  test::WriteFile(dir / "bad.tsv", "id\tunix_time\ttype\tscope\ttext\nabc\t1\tfix\n");
  r = test::RunCmd({test::BinDir() + "/cortex-bench", "replay", "--corpus", dir / "bad.tsv"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("bad.tsv:2: expected 5 columns"), std::string::npos) << r.err;
}

TEST(BenchTest, SoakSurvivesMisbehavingExpertsAndLosesNothing) {
  TempDir dir;
  const std::string out = dir / "soak.json";
  test::Run r = test::RunCmd(
      {test::BinDir() + "/cortex-bench", "soak", "--clients", "4", "--seconds", "6", "--json", out},
      120);
  json j = json::parse(test::ReadFile(out), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out << r.err;
  EXPECT_GT(j["tasks"].get<long>(), 50) << r.out;
  EXPECT_EQ(j["lost"], 0) << r.out;
  EXPECT_EQ(j["request_errors"], 0) << r.out;
  EXPECT_EQ(j["daemon_alive_at_end"], true);
  EXPECT_EQ(j["daemon_exit"], 0);
  // Its plugin hosts crashed (segfaults, memory) and were restarted; cortexd did not.
  EXPECT_GT(j["crashes_survived"].get<long>(), 0) << r.out;
  EXPECT_GT(j["host_crashes"].get<long>(), 0) << r.out;
  EXPECT_GT(j["host_restarts"].get<long>(), 0) << r.out;
  EXPECT_GT(j["peak_rss_kib"].get<long>(), 0);
}

// Without --socket, throughput runs a cortexd of its own: nothing lands in the user's
// store, and its temporary folder goes with it.
TEST(BenchTest, ThroughputUsesACortexdOfItsOwn) {
  TempDir dir;
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("XDG_DATA_HOME=" + dir / "data");
  env.push_back("XDG_RUNTIME_DIR=" + dir / "run");
  const std::string out = dir / "tp.json";
  // A run per client count, on disk and on tmpfs: a table row each.
  test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", "throughput", "--tasks", "20",
                              "--clients", "1", "3", "--json", out},
                             120, "", env);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  json j = json::parse(test::ReadFile(out), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  ASSERT_EQ(j["runs"].size(), 4u) << j;
  std::vector<std::pair<std::string, int>> seen;
  for (const auto& run : j["runs"]) {
    seen.emplace_back(run["store"], run["clients"]);
    EXPECT_EQ(run["succeeded"], 20) << run;
    EXPECT_EQ(run["errors"], 0) << run;
    EXPECT_GT(run["tasks_per_s"].get<double>(), 0) << run;
    EXPECT_GT(run["p99_ms"].get<double>(), 0) << run;
    EXPECT_GT(run.value("log_peak_mib", 0.0), 0) << "its store's log, watched" << run;
  }
  EXPECT_EQ(seen, (std::vector<std::pair<std::string, int>>{
                      {"disk", 1}, {"disk", 3}, {"tmpfs", 1}, {"tmpfs", 3}}));
  EXPECT_EQ(r.out.rfind("store   clients   tasks/s", 0), 0u) << r.out;
  EXPECT_FALSE(fs::exists(dir / "data/cortex")) << "the user's data folder was used";
  // Its cortexd's folders are gone afterwards.
  for (const char* medium : {"disk: ", "tmpfs: "}) {
    const size_t a = r.err.find(medium), p = r.err.find("of its own (", a), b = r.err.find(')', p);
    ASSERT_NE(p, std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(r.err.substr(p + 12, b - p - 12))) << r.err;
  }
}

// A throughput run that reaches no cortexd says why, counts no rate, and fails.
TEST(BenchTest, ThroughputSaysWhyItFailed) {
  TempDir dir;
  const std::string out = dir / "tp.json";
  test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", "throughput", "--tasks", "3",
                              "--clients", "4", "--socket", dir / "none.sock", "--json", out});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("first error: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("none.sock"), std::string::npos) << r.err;
  json j = json::parse(test::ReadFile(out), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["runs"][0]["errors"], 3) << "every task unanswered, no more" << j;
  EXPECT_EQ(j["runs"][0]["tasks_per_s"], 0) << j;
  EXPECT_FALSE(j["runs"][0].contains("log_peak_mib")) << "not our cortexd's log" << j;
  r = test::RunCmd({test::BinDir() + "/cortex-bench", "--version"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("cortex-bench ", 0), 0u) << r.out;
}

// `train --population K` fits a retrain's population on the chosen engine and says how
// many candidates a second that is.
TEST(BenchTest, TrainReportsAPopulationsCandidatesPerSecond) {
  test::TempDir dir;
  const std::string out = dir / "train.json";
  test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", "train", "--examples", "2000",
                              "--population", "3", "--json", out});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("a population of 3 candidates (cpu)"), std::string::npos) << r.out;
  json j = json::parse(test::ReadFile(out), nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["population"]["candidates"], 3) << j;
  EXPECT_GT(j["population"]["candidates_per_s"].get<double>(), 0) << j;
  r = test::RunCmd({test::BinDir() + "/cortex-bench", "train", "--population", "5"});
  EXPECT_NE(r.code, 0);
}

// Every option of every cortex-bench subcommand says what it is.
TEST(BenchTest, EveryOptionHasHelp) {
  for (const char* sub : {"replay", "throughput", "score", "train", "soak"}) {
    test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", sub, "--help"});
    ASSERT_EQ(r.code, 0) << sub;
    std::istringstream lines(r.out.substr(r.out.find("Options:")));
    std::string line, pending;
    std::getline(lines, line);
    while (std::getline(lines, line)) {
      if (line.rfind("  -", 0) != 0) {  // a description on its own line
        pending.clear();
        continue;
      }
      if (!pending.empty()) ADD_FAILURE() << sub << ": " << pending << " has no help";
      // "  --name TYPE   description": an option line whose text ends with its type.
      const size_t gap = line.find("  ", 2);
      pending = gap == std::string::npos || line.find_first_not_of(' ', gap) == std::string::npos
                    ? line
                    : "";
    }
    if (!pending.empty()) ADD_FAILURE() << sub << ": " << pending << " has no help";
  }
}

}  // namespace
}  // namespace cortex
