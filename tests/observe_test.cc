// What a person or a dashboard looks at, end to end through cortexd, cortexctl and
// cortex-bench: the report page and the replay page (checked in a real headless
// Chromium: no console error, no request, every plot drawn, a screenshot kept under
// build/test-output/), the Prometheus endpoint, and the README's demo.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "testutil.h"

namespace cortex {
namespace {

using test::Daemon;
using test::TempDir;
using json = nlohmann::json;
namespace fs = std::filesystem;

const std::string kSourceDir = CORTEX_TEST_SOURCE_DIR;
const std::string kOutputDir = CORTEX_TEST_OUTPUT_DIR;

std::string Chromium() {
  for (const char* p : {"/usr/bin/chromium", "/usr/bin/chromium-browser"})
    if (access(p, X_OK) == 0) return p;
  return "";
}

// Loads `page` in headless Chromium (tests/browser/check_page.py): fails the test on any
// console error or uncaught exception, any network request, or a plot without points;
// keeps a screenshot at `png`. Returns what the checker said.
json CheckInBrowser(const std::string& page, const std::string& png, int expect_plots) {
  test::Run r =
      test::RunCmd({"python3", kSourceDir + "/tests/browser/check_page.py", page, "--screenshot",
                    png, "--expect-plots", std::to_string(expect_plots), "--chromium", Chromium()},
                   120);
  json j = json::parse(r.out, nullptr, false);
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_TRUE(j.is_object() && j.value("ok", false)) << r.out << r.err;
  EXPECT_GT(fs::exists(png) ? fs::file_size(png) : 0, 10000u) << "no screenshot at " << png;
  return j;
}

// A page that opens from disk: no element loads anything from elsewhere, a policy that
// forbids requests, Chart.js inline.
void ExpectSelfContained(const std::string& html) {
  EXPECT_NE(html.find("Content-Security-Policy"), std::string::npos);
  EXPECT_NE(html.find("Chart.js v3.9.1"), std::string::npos);
  std::smatch m;
  EXPECT_FALSE(
      std::regex_search(html, m, std::regex(R"(<(script|link|img|iframe)[^>]*(src|href)=)")))
      << m.str();
}

const char* kReportExperts = R"(experts:
  - name: good
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; exit 0"]
    keywords: ["deploy", "release"]
  - name: bad
    plugin: command
    run: ["/bin/sh", "-c", "cat >/dev/null; exit 3"]
    keywords: ["deploy", "release", "ship"]
  - name: crasher
    plugin: misbehave
    keywords: ["segfault"]
rules:
  - name: shipping
    match: ["ship"]
    expert: bad
    boost: 0.05
  - name: segfaults
    match: ["segfault"]
    expert: crasher
    boost: 5
)";

TEST(Report, APageFromARealDaemonOpensOfflineAndDrawsEveryPlot) {
  TempDir dir;
  Daemon d(dir, kReportExperts, "router: {exploration: 0.3, seed: 7}\ntraining: {online: true}\n",
           /*bundled=*/true, ", restart_backoff: 10ms");
  d.AddPlugin(test::BenchPluginDir() + "/misbehave.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  const int n = 150;  // enough for a retrain to hold out the 20 decisions it validates on
  for (int i = 0; i < n; ++i)
    ASSERT_EQ(
        d.Ctl({"submit", (i % 3 ? "deploy the api " : "ship release ") + std::to_string(i)}).code,
        0);
  // A crash: an event on the timeline.
  d.Ctl({"submit", "please segfault now", "--wait"});
  ASSERT_TRUE(
      d.WaitStatus([](const json& s) { return s["queue_depth"] == 0 && s["inflight"] == 0; }));
  // Two versions: each retrain after a new outcome (one with nothing new is skipped).
  for (int k = 0; k < 2; ++k) {
    if (k) ASSERT_LE(d.Ctl({"submit", "one more bug to fix", "--wait"}).code, 1);
    ASSERT_EQ(d.Ctl({"retrain", "--wait"}).code, 0);
  }

  // The aggregates behind the page agree with the audit.
  json agg = d.CtlJson({"report"});
  ASSERT_TRUE(agg.is_object()) << agg;
  EXPECT_EQ(agg["tasks"], n + 2);  // with the crash and the one more
  long decided = 0;
  for (const auto& v : agg["buckets"]["decided"]) decided += v.get<long>();
  EXPECT_EQ(decided, n + 2);
  EXPECT_EQ(agg["models"].size(), 2u);
  EXPECT_TRUE(agg["share"].contains("good") && agg["share"].contains("bad")) << agg["share"];
  EXPECT_TRUE(agg["events"].contains("crash")) << agg["events"];
  ASSERT_FALSE(agg["rules"].empty());
  EXPECT_EQ(agg["rules"][0]["rule"], "shipping");

  const std::string page = dir / "report.html";
  test::Run r = d.Ctl({"report", "--html", page});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find(page), std::string::npos) << r.out;
  const std::string html = test::ReadFile(page);
  ExpectSelfContained(html);
  for (const auto& e : fs::directory_iterator(dir.path()))  // no temporary file left
    EXPECT_EQ(e.path().filename().string().find("report.html."), std::string::npos) << e.path();
  if (Chromium().empty())
    GTEST_SKIP() << "chromium is not installed (scripts/install-deps.sh installs it)";
  json seen = CheckInBrowser(page, kOutputDir + "/report.png", 8);
  for (const char* plot : {"success", "share", "calibration", "latency", "latency_time", "retrains",
                           "events", "rules"})
    EXPECT_GT(seen["plots"].value(plot, 0), 0) << plot << ": " << seen;
}

TEST(Report, SinceNarrowsTheWindowAndMistakesAreToldNotWritten) {
  TempDir dir;
  Daemon d(dir, kReportExperts, "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n");
  d.AddPlugin(test::BenchPluginDir() + "/misbehave.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  for (int i = 0; i < 3; ++i) ASSERT_EQ(d.Ctl({"submit", "deploy it", "--wait"}).code, 0);

  EXPECT_EQ(d.CtlJson({"report", "--since", "1h"})["tasks"], 3);
  EXPECT_EQ(d.CtlJson({"report", "--since", "2099-01-01"})["tasks"], 0);
  test::Run r = d.Ctl({"report"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--html FILE is required"), std::string::npos) << r.err;
  r = d.Ctl({"report", "--html", dir / "x.html", "--since", "last tuesday"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("is not a time"), std::string::npos) << r.err;
  // A folder that does not exist: a clear failure, and nothing half-written anywhere.
  r = d.Ctl({"report", "--html", dir / "missing/x.html"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("cannot write"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "missing"));
  json j = d.CtlJson({"report", "--html", dir / "missing/x.html"});
  EXPECT_TRUE(j.contains("error")) << j;
  // A page written over an existing one keeps its permissions; a link at the path is
  // replaced, its target untouched.
  const std::string priv = dir / "private.html";
  test::WriteFile(priv, "old");
  fs::permissions(priv, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::replace);
  ASSERT_EQ(d.Ctl({"report", "--html", priv}).code, 0);
  EXPECT_EQ(fs::status(priv).permissions(), fs::perms::owner_read | fs::perms::owner_write);
  test::WriteFile(dir / "target.txt", "keep me");
  fs::create_symlink(dir / "target.txt", dir / "link.html");
  ASSERT_EQ(d.Ctl({"report", "--html", dir / "link.html"}).code, 0);
  EXPECT_EQ(test::ReadFile(dir / "target.txt"), "keep me");
  EXPECT_FALSE(fs::is_symlink(dir / "link.html"));
  // A page that cannot reach standard output is a failure.
  EXPECT_NE(test::RunCmd({"sh", "-c",
                          test::BinDir() + "/cortexctl --socket " + d.socket +
                              " report --html - > /dev/full"})
                .code,
            0);
  // To standard output, the same page.
  r = d.Ctl({"report", "--html", "-"});
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out.rfind("<!DOCTYPE html>", 0), 0u);
  r = d.Ctl({"report", "--html", "-", "--json"});
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(r.Json().contains("error")) << r.out;
}

TEST(Replay, ThePageDrawsTheLearningCurveAgainstTheBaselines) {
  TempDir dir;
  // The first 800 rows of the demo's sample: a real stream, small enough for a test.
  std::ifstream in(kSourceDir + "/samples/vuejs_core-demo.tsv");
  std::ofstream out(dir / "corpus.tsv");
  std::string line;
  for (int i = 0; i < 801 && std::getline(in, line); ++i) out << line << "\n";
  out.close();
  const std::string page = dir / "replay.html";
  test::Run r = test::RunCmd({test::BinDir() + "/cortex-bench", "replay", "--corpus",
                              dir / "corpus.tsv", "--html", page, "--json", dir / "replay.json"},
                             300);
  ASSERT_EQ(r.code, 0) << r.err;
  json rep = json::parse(test::ReadFile(dir / "replay.json"));
  const std::string html = test::ReadFile(page);
  ExpectSelfContained(html);
  // The page carries the run's own figures.
  EXPECT_NE(html.find("\"online_success\":" + json(rep["online_success"]).dump()),
            std::string::npos);
  if (Chromium().empty())
    GTEST_SKIP() << "chromium is not installed (scripts/install-deps.sh installs it)";
  json seen = CheckInBrowser(page, kOutputDir + "/replay.png", 2);
  EXPECT_GE(seen["plots"].value("curve", 0), 200 * 3) << seen;  // three curves of 200 points
  EXPECT_GT(seen["plots"].value("share", 0), 0) << seen;
}

// Prometheus text format: "name{labels} value" lines into a map.
std::map<std::string, double> ParseMetrics(const std::string& text) {
  std::map<std::string, double> m;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    m[line.substr(0, sp)] = std::stod(line.substr(sp + 1));
  }
  return m;
}

TEST(Metrics, ServedOnLoopbackCountingWhatHappened) {
  TempDir dir;
  Daemon d(dir, std::string("metrics: {listen: \"127.0.0.1:0\"}\n") + kReportExperts,
           "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n");
  d.AddPlugin(test::BenchPluginDir() + "/misbehave.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  const std::string url = d.CtlJson({"status"}).value("metrics", "");
  std::smatch m;
  ASSERT_TRUE(std::regex_match(url, m, std::regex(R"(http://127\.0\.0\.1:(\d+)/metrics)"))) << url;
  httplib::Client http("127.0.0.1", std::stoi(m[1]));
  // "ship" goes to `bad` (rule boost), fails and falls back to `good`; "deploy" to one of
  // them by the prior; all five end succeeded.
  for (int i = 0; i < 4; ++i)
    ASSERT_EQ(d.Ctl({"submit", "deploy " + std::to_string(i), "--wait"}).code, 0);
  ASSERT_EQ(d.Ctl({"submit", "ship it", "--wait"}).code, 0);
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_NE(res->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  auto v = ParseMetrics(res->body);
  EXPECT_EQ(v["cortex_tasks_total{state=\"queued\"}"], 5);
  EXPECT_EQ(v["cortex_tasks_total{state=\"succeeded\"}"], 5);
  EXPECT_EQ(v["cortex_tasks_total{state=\"failed\"}"], 0);
  double decisions = 0, attempts = 0;
  for (const auto& [k, n] : v) {
    if (k.rfind("cortex_decisions_total{", 0) == 0) decisions += n;
    if (k.rfind("cortex_attempts_total{", 0) == 0) attempts += n;
  }
  EXPECT_EQ(decisions, 5);
  EXPECT_EQ(v["cortex_decisions_total{expert=\"bad\",explored=\"false\"}"] +
                v["cortex_decisions_total{expert=\"good\",explored=\"false\"}"],
            5);
  EXPECT_GE(v["cortex_attempts_total{expert=\"bad\",outcome=\"failure\"}"], 1);
  EXPECT_EQ(attempts, 5 + v["cortex_attempts_total{expert=\"bad\",outcome=\"failure\"}"]);
  EXPECT_EQ(v["cortex_task_duration_seconds_count"], 5);
  EXPECT_EQ(v["cortex_task_duration_seconds_bucket{le=\"+Inf\"}"], 5);
  EXPECT_GT(v["cortex_task_duration_seconds_sum"], 0);
  EXPECT_EQ(v["cortex_route_duration_seconds_count"], 5);
  EXPECT_EQ(v["cortex_queue_depth"], 0);
  EXPECT_EQ(v["cortex_model_version"], 0);
  EXPECT_EQ(v["cortex_expert_quarantined{expert=\"good\"}"], 0);
  EXPECT_EQ(v.count("cortex_plugin_host_restarts_total{expert=\"crasher\"}"), 1u);
  // A crash, then the host's restart for the next task; a retrain, by its verdict.
  for (int i = 0; i < 2; ++i) d.Ctl({"submit", "please segfault", "--wait"});
  ASSERT_EQ(d.Ctl({"retrain", "--wait"}).code, 0);
  ASSERT_TRUE(test::Eventually([&] {
    auto r = http.Get("/metrics");
    if (!r) return false;
    auto w = ParseMetrics(r->body);
    return w["cortex_plugin_host_restarts_total{expert=\"crasher\"}"] >= 1 &&
           w["cortex_retrains_total{verdict=\"promoted\"}"] +
                   w["cortex_retrains_total{verdict=\"refused\"}"] ==
               1;
  })) << http.Get("/metrics")->body;
  // The Grafana dashboard asks only for what is served.
  const std::string dash = test::ReadFile(kSourceDir + "/contrib/grafana/cortex-dashboard.json");
  ASSERT_FALSE(dash.empty());
  const std::string body = http.Get("/metrics")->body;
  std::set<std::string> asked;
  const std::regex name(R"(cortex_[a-z_]+)");
  for (std::sregex_iterator it(dash.begin(), dash.end(), name), end; it != end; ++it)
    asked.insert(it->str());
  EXPECT_GE(asked.size(), 8u);
  for (const auto& name : asked)
    EXPECT_NE(body.find("\n" + name), std::string::npos) << "the dashboard uses " << name;
  // Only /metrics is served.
  auto other = http.Get("/");
  ASSERT_TRUE(other);
  EXPECT_EQ(other->status, 404);
  // A second cortexd asking for the same port does not share it: it runs without
  // metrics and says why.
  TempDir dir2;
  Daemon second(dir2, "metrics: {listen: \"127.0.0.1:" + std::string(m[1]) + "\"}\n");
  ASSERT_TRUE(second.Start()) << second.Log();
  json st2 = second.CtlJson({"status"});
  EXPECT_TRUE(st2["metrics"].is_null()) << st2;
  EXPECT_NE(st2.value("metrics_error", "").find("cannot listen on 127.0.0.1:" + std::string(m[1])),
            std::string::npos)
      << st2;
  EXPECT_NE(second.Ctl({"status"}).out.find("METRICS NOT SERVED"), std::string::npos);
  EXPECT_EQ(second.Stop(), 0);
  // A stop closes the endpoint with the daemon.
  EXPECT_EQ(d.Stop(), 0);
  EXPECT_FALSE(http.Get("/metrics"));
}

TEST(Metrics, OnlyALoopbackAddressIsAcceptedAndATakenPortRefusesTheStart) {
  TempDir dir;
  const std::vector<std::pair<const char*, const char*>> bad = {
      {"0.0.0.0:9464", "loopback"},    {"192.168.1.5:9464", "loopback"},
      {"example.com:80", "loopback"},  {"127.0.0.1", "loopback"},
      {"[::]:9464", "loopback"},       {"2130706433:80", "loopback"},
      {"127.0.0.1:99999", "the port"}, {"127.0.0.1:http", "the port"}};
  for (const auto& [value, why] : bad) {
    Daemon d(dir, std::string("metrics: {listen: \"") + value + "\"}\n");
    test::Run r =
        test::RunCmd({test::BinDir() + "/cortexd", "--check-config", "--config", d.config});
    EXPECT_EQ(r.code, 1) << value;
    EXPECT_NE(r.err.find("metrics.listen"), std::string::npos) << value << ": " << r.err;
    EXPECT_NE(r.err.find(why), std::string::npos) << value << ": " << r.err;
  }
  for (const char* good : {"127.0.0.1:0", "localhost:9464", "[::1]:9464", "127.1.2.3:1"}) {
    Daemon d(dir, std::string("metrics: {listen: \"") + good + "\"}\n");
    test::Run r =
        test::RunCmd({test::BinDir() + "/cortexd", "--check-config", "--config", d.config});
    EXPECT_EQ(r.code, 0) << good << ": " << r.err;
  }
  // A port someone else holds (any local user can take one): cortexd still starts, runs
  // without the endpoint and says why; a slow or idle client cannot hold its stop.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  {
    Daemon d(dir, "metrics: {listen: \"127.0.0.1:" + std::to_string(ntohs(a.sin_port)) + "\"}\n");
    ASSERT_TRUE(d.Start()) << d.Log();
    EXPECT_NE(d.CtlJson({"status"}).value("metrics_error", "").find("cannot listen"),
              std::string::npos);
    EXPECT_EQ(d.Stop(), 0);
  }
  close(fd);
}

TEST(Metrics, IdleOrTricklingClientsNeitherStarveTheDaemonNorHoldItsStop) {
  TempDir dir;
  Daemon d(dir, "metrics: {listen: \"127.0.0.1:0\"}\n");
  ASSERT_TRUE(d.Start()) << d.Log();
  std::smatch m;
  const std::string url = d.CtlJson({"status"}).value("metrics", "");
  ASSERT_TRUE(std::regex_match(url, m, std::regex(R"(http://127\.0\.0\.1:(\d+)/metrics)"))) << url;
  const int port = std::stoi(m[1]);
  // Many idle connections, and some that send a request a byte at a time.
  std::vector<int> held;
  for (int i = 0; i < 300; ++i) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    // (Non-blocking: past the listen backlog a connect would wait for the kernel's retries.)
    fcntl(c, F_SETFL, O_NONBLOCK);
    if (connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS) {
      close(c);
      continue;
    }
    if (i % 10 == 0) (void)!write(c, "G", 1);
    held.push_back(c);
  }
  ASSERT_GT(held.size(), 100u);
  // cortexd holds few of them: the rest wait in the kernel's backlog.
  const auto fds = std::distance(fs::directory_iterator("/proc/" + std::to_string(d.pid) + "/fd"),
                                 fs::directory_iterator());
  EXPECT_LT(fds, 150) << "cortexd holds " << fds << " descriptors";
  // The socket still answers at once.
  test::Run st = d.Ctl({"status", "--json"}, 10);
  EXPECT_EQ(st.code, 0);
  // And a stop is not held up by them.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(d.Stop(SIGTERM, 20), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(15));
  for (int c : held) close(c);
}

// The README's main command, on the built binaries (DEMO_BIN skips install and build) and
// a shorter stream: it runs to the end, shows the learning and writes the report.
TEST(Demo, ShowsTheRouterLearningAndWritesTheReport) {
  TempDir dir;
  // demo.sh keeps its files in the checkout's .demo/: run it from a copy of what it reads.
  const std::string root = dir / "src";
  fs::create_directories(root);
  for (const char* p : {"scripts", "samples"})
    fs::copy(kSourceDir + "/" + p, root + "/" + p, fs::copy_options::recursive);
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("DEMO_BIN=" + test::BinDir());
  env.push_back("DEMO_TASKS=600");
  env.push_back("DEMO_WINDOW=200");
  test::Run r = test::RunCmd({"bash", root + "/scripts/demo.sh"}, 600, "", env, root);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("SIMULATED GRADERS"), std::string::npos) << r.out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(600/600 tasks  first-pick success)")))
      << r.out;
  EXPECT_NE(r.out.find("before and after"), std::string::npos) << r.out;
  // The real work on the checkout reaches the bundled experts, whatever the model learned.
  EXPECT_TRUE(
      std::regex_search(r.out, std::regex(R"(succeeded: security \(.*\n.*security scan of )")))
      << r.out;
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(succeeded: inventory \(.*\n.*inventory of )")))
      << r.out;
  EXPECT_NE(r.out.find("report: " + root + "/.demo/report.html ("), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(root + "/.demo/report.html"));
  // Nothing left running: its cortexd was stopped at the end.
  EXPECT_FALSE(test::Eventually(
      [&] {
        return test::RunCmd({"pgrep", "-f", root + "/scripts/demo/cortex.yaml"}).code == 0;
      },
      0.5));
}

}  // namespace
}  // namespace cortex
