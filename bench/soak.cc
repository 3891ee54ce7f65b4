// cortex-bench soak: N clients for T seconds against a cortexd of its own whose experts
// include one that crashes (SIGSEGV), one that hangs past its timeout and a slow one.
// Reports tasks/s, latency percentiles, acknowledged tasks lost (must be 0), crashes
// survived and the daemon's resident memory over time (must stay flat).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include "bench.h"
#include "cortex/client.h"

namespace cortex::bench {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

long RssKiB(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

}  // namespace

int Soak(const SoakOptions& o) {
  char tmpl[] = "/tmp/cortex-soak-XXXXXX";
  if (!mkdtemp(tmpl)) return std::perror("cortex-bench: mkdtemp"), 1;
  const fs::path dir = tmpl;
  fs::create_directories(dir / "plugins");
  fs::permissions(dir / "plugins", fs::perms::owner_all, fs::perm_options::replace);
  const std::string socket = (dir / "run/cortexd.sock").string();
  {
    std::ofstream cfg(dir / "cortex.yaml");
    cfg << "daemon: {socket: " << socket << ", workers: 8, shutdown_grace: 2s}\n"
        << "store: {path: " << (dir / "data/cortex.db").string() << "}\n"
        << "plugins: {dir: " << (dir / "plugins").string() << "}\n"
        << "router: {exploration: 0.1, max_attempts: 3}\n"
        << "training: {interval: 5s, min_new_outcomes: 200}\n"
        << "experts:\n"
        << "  - {name: crasher, plugin: command, run: [/bin/sh, -c, 'kill -SEGV $$'], "
           "keywords: [build, crash]}\n"
        << "  - {name: hanger, plugin: command, run: [sleep, '3600'], timeout: 300ms, "
           "keywords: [deploy, hang]}\n"
        << "  - {name: slow, plugin: command, run: [sleep, '0.05'], keywords: [report, slow]}\n"
        << "  - {name: steady, plugin: command, run: [/bin/sh, -c, 'cat >/dev/null'], "
           "keywords: [fix, bug]}\n";
  }
  const std::string cortexd =
      o.cortexd.empty() ? (fs::read_symlink("/proc/self/exe").parent_path() / "cortexd").string()
                        : o.cortexd;
  pid_t pid = fork();
  if (pid == 0) {
    FILE* f = freopen((dir / "cortexd.log").c_str(), "w", stderr);
    (void)f;
    execl(cortexd.c_str(), cortexd.c_str(), "--foreground", "--config",
          (dir / "cortex.yaml").c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  bool up = false;
  for (int i = 0; i < 200 && !up; ++i) {
    Client c;
    json r;
    up = c.Connect(socket).ok() && c.Call({{"op", "status"}}, &r).ok();
    if (!up) usleep(50000);
  }
  if (!up) {
    std::fprintf(stderr, "cortex-bench: cortexd did not start (log: %s)\n",
                 (dir / "cortexd.log").c_str());
    kill(pid, SIGKILL);
    return 1;
  }

  const char* texts[] = {"fix the login bug",        "build the release artifacts",
                         "deploy the canary",        "write the weekly report",
                         "fix crash in the parser",  "slow report for finance",
                         "hang detector for deploy", "bug in the cache"};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<double> lat;
  std::set<std::string> acked, unfinished;
  long succeeded = 0, failed = 0, errors = 0, crashes = 0, timeouts = 0;
  std::vector<std::pair<double, long>> rss;  // (seconds, KiB)
  const auto t0 = Clock::now();
  auto secs = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  std::thread sampler([&] {
    while (!stop.load()) {
      rss.emplace_back(secs(), RssKiB(pid));
      usleep(250000);
    }
  });
  std::vector<std::thread> clients;
  for (int c = 0; c < o.clients; ++c)
    clients.emplace_back([&, c] {
      Client cl;
      if (!cl.Connect(socket).ok()) return;
      for (int i = c; !stop.load(); i += o.clients) {
        const auto s = Clock::now();
        json resp;
        Status st = cl.Call({{"op", "submit"},
                             {"text", std::string(texts[i % 8]) + " #" + std::to_string(i)},
                             {"wait", true},
                             {"timeout_s", 60}},
                            &resp);
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - s).count();
        std::lock_guard<std::mutex> l(mu);
        if (!st.ok() || !resp.value("ok", false)) {
          ++errors;
          if (!st.ok()) return;
          continue;
        }
        const json& r = resp["result"];
        const std::string id = r.value("id", "");
        acked.insert(id);
        lat.push_back(ms);
        const std::string state = r.value("state", "");
        if (state == "succeeded")
          ++succeeded;
        else if (state == "failed")
          ++failed;
        else
          unfinished.insert(id);
        for (const auto& a : r.value("attempts", json::array())) {
          const std::string kind = a.value("outcome", json::object()).value("kind", "");
          crashes += kind == "crash";
          timeouts += kind == "timeout";
        }
      }
    });
  while (secs() < o.seconds) usleep(100000);
  stop = true;
  for (auto& t : clients) t.join();
  sampler.join();
  const double elapsed = secs();

  // Lost: acknowledged, yet not in a final state once the daemon has drained.
  long lost = 0;
  {
    Client c;
    if (c.Connect(socket).ok())
      for (const auto& id : unfinished) {
        json r;
        if (!c.Call({{"op", "show"}, {"id", id}}, &r).ok() || !r.value("ok", false)) {
          ++lost;
          continue;
        }
        const std::string s = r["result"].value("state", "");
        if (s != "succeeded" && s != "failed" && s != "interrupted") ++lost;
      }
  }
  const bool alive = kill(pid, 0) == 0;
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  const int exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);

  // Flat memory: the peak of the last quarter against the peak of the second quarter
  // (the first holds start-up).
  long peak = 0, q2 = 0, q4 = 0;
  for (const auto& [t, kib] : rss) {
    peak = std::max(peak, kib);
    if (t >= elapsed * 0.25 && t < elapsed * 0.5) q2 = std::max(q2, kib);
    if (t >= elapsed * 0.75) q4 = std::max(q4, kib);
  }
  json j = {{"clients", o.clients},
            {"seconds", elapsed},
            {"tasks", static_cast<long>(acked.size())},
            {"tasks_per_s", acked.size() / elapsed},
            {"p50_ms", Percentile(lat, 0.5)},
            {"p99_ms", Percentile(lat, 0.99)},
            {"succeeded", succeeded},
            {"failed", failed},
            {"request_errors", errors},
            {"lost", lost},
            {"crashes_survived", crashes},
            {"timeouts", timeouts},
            {"daemon_alive_at_end", alive},
            {"daemon_exit", exit_code},
            {"peak_rss_kib", peak},
            {"rss_peak_q2_kib", q2},
            {"rss_peak_q4_kib", q4}};
  std::printf(
      "soak: %d clients, %.0fs: %zu tasks (%.0f/s), p50 %.1f ms, p99 %.1f ms; %ld succeeded, "
      "%ld failed, %ld request errors\n"
      "  lost %ld; crashes survived %ld, timeouts %ld; daemon %s, exit %d\n"
      "  peak RSS %ld KiB (2nd quarter %ld, last quarter %ld)\n",
      o.clients, elapsed, acked.size(), acked.size() / elapsed, Percentile(lat, 0.5),
      Percentile(lat, 0.99), succeeded, failed, errors, lost, crashes, timeouts,
      alive ? "alive" : "DEAD", exit_code, peak, q2, q4);
  WriteJson(o.json_out, j);
  std::error_code ec;
  fs::remove_all(dir, ec);
  return lost == 0 && alive && exit_code == 0 ? 0 : 1;
}

}  // namespace cortex::bench
