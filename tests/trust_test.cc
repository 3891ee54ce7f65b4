// Issue 24, the third outside attack: what another local user could do through an install
// with loose modes, the socket's group, a password in libpq's messages, and what a start
// refused for its config leaves behind. The users here are real: tests that need a second
// one run as root and drop to 'nobody'/'nogroup' through setpriv.
#include <grp.h>
#include <gtest/gtest.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "cortex/config.h"
#include "cortex/daemon.h"
#include "cortex/env.h"
#include "cortex/status.h"
#include "cortex/store_url.h"
#include "testutil.h"

namespace cortex {
namespace {

using test::Daemon;
using test::TempDir;
using json = nlohmann::json;
namespace fs = std::filesystem;

bool CanActAsNobody() {
  return geteuid() == 0 && getpwnam("nobody") && getgrnam("nogroup") &&
         test::RunCmd({"sh", "-c", "command -v setpriv"}).code == 0;
}
#define SKIP_UNLESS_SECOND_USER()                                                       \
  if (!CanActAsNobody())                                                                \
  GTEST_SKIP() << "needs root, setpriv (util-linux) and the user 'nobody' to act as a " \
                  "second user"

// argv as 'nobody' with primary group `group` and no other.
test::Run As(const std::string& group, std::vector<std::string> argv) {
  argv.insert(argv.begin(),
              {"setpriv", "--reuid=nobody", "--regid=" + group, "--clear-groups", "--"});
  return test::RunCmd(argv, 60, "", test::BaseEnv(), "/");
}

struct stat StatOf(const std::string& path) {
  struct stat st {};
  lstat(path.c_str(), &st);
  return st;
}

// Seconds since the epoch of a time as cortexd's JSON prints it (2026-12-07T05:31:00.123Z).
double IsoSecondsOf(const json& v) {
  struct tm tm {};
  int ms = 0;
  const std::string s = v.is_string() ? v.get<std::string>() : "";
  if (sscanf(s.c_str(), "%d-%d-%dT%d:%d:%d.%dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
             &tm.tm_min, &tm.tm_sec, &ms) != 7)
    return 0;
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  return static_cast<double>(timegm(&tm)) + ms / 1000.0;
}

// ---- 1: the install and the plugin host ---------------------------------------------

// `cmake --install` by an installer whose group is nogroup, under umask 002. A member of
// that group replaced lib/cortex/cortex-plugin-host with a script of their own and cortexd
// ran it for every expert. Now every folder the install makes is 0755 whatever the umask,
// so the member cannot.
TEST(Trust, InstallUnderUmask002LeavesNothingTheGroupCanChange) {
  SKIP_UNLESS_SECOND_USER();
  TempDir dir;
  fs::permissions(dir.path(), fs::perms(0755), fs::perm_options::replace);
  const std::string prefix = dir / "opt";
  test::Run r = test::RunCmd({"setpriv", "--regid=nogroup", "--clear-groups", "--", "sh", "-c",
                              "umask 002 && exec \"$0\" --install \"$1\" --prefix \"$2\"",
                              CORTEX_TEST_CMAKE, CORTEX_TEST_BUILD_DIR, prefix},
                             300);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  ASSERT_EQ(StatOf(prefix + "/lib/cortex").st_gid, getgrnam("nogroup")->gr_gid);
  int checked = 0;
  EXPECT_EQ(StatOf(prefix).st_mode & 07777, 0755u);
  for (const auto& e : fs::recursive_directory_iterator(prefix)) {
    const struct stat st = StatOf(e.path());
    EXPECT_EQ(st.st_mode & 022, 0u) << e.path() << " is writable by group or others (mode "
                                    << std::oct << (st.st_mode & 07777) << ")";
    ++checked;
  }
  EXPECT_GT(checked, 20);
  // The group's member tries what the attacker did: neither replacing the host nor
  // putting a file beside it works.
  const std::string host = prefix + "/lib/cortex/cortex-plugin-host";
  ASSERT_TRUE(fs::exists(host));
  EXPECT_NE(As("nogroup", {"sh", "-c", "echo '#!/bin/sh' > \"$0\"", host}).code, 0);
  EXPECT_NE(As("nogroup", {"cp", "/bin/true", prefix + "/lib/cortex/evil"}).code, 0);
  EXPECT_NE(As("nogroup", {"mv", host, host + ".real"}).code, 0);
  EXPECT_TRUE(fs::exists(host));

  // A folder above the host that the group may change (chmod by a careless operator) is
  // refused before any host runs: at --check-config and at a start, naming the folder.
  fs::permissions(prefix + "/lib/cortex", fs::perms(0775), fs::perm_options::replace);
  TempDir home;
  Daemon d(home);
  d.bin_dir = prefix + "/bin";
  r = test::RunCmd({d.bin_dir + "/cortexd", "--check-config", "--config", d.config});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  const std::string why = "refusing to run the plugin host: unsafe permissions: " + prefix +
                          "/lib/cortex (a folder above " + host +
                          ") is writable by its group (mode 0775)";
  EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
  // The member of the group now swaps the host: it never runs.
  ASSERT_EQ(As("nogroup", {"sh", "-c",
                           "mv \"$0\" \"$0.real\" && printf '#!/bin/sh\\ntouch \"$1\"\\n' > "
                           "\"$0\" && chmod 755 \"$0\"",
                           host, home / "ran"})
                .code,
            0);
  EXPECT_FALSE(d.Start());
  EXPECT_EQ(d.exit_status, 1);
  EXPECT_NE(d.Log().find("refusing to run the plugin host"), std::string::npos) << d.Log();
  EXPECT_FALSE(fs::exists(home / "ran")) << "the other user's program ran";
  EXPECT_FALSE(fs::exists(d.store)) << "nothing is created for a start that is refused";
}

// The host itself, reached through a symlink into a folder others may write: refused by
// the file's real place, and said so.
TEST(Trust, APluginHostReachedThroughASymlinkIsJudgedWhereItLies) {
  TempDir dir;
  fs::permissions(dir.path(), fs::perms(0755), fs::perm_options::replace);
  const std::string bin = dir / "p/bin", lib = dir / "p/lib/cortex", loose = dir / "loose";
  fs::create_directories(bin);
  fs::create_directories(lib);
  fs::create_directories(loose);
  fs::copy_file(test::BinDir() + "/cortexd", bin + "/cortexd");
  fs::copy_file(test::BinDir() + "/cortexctl", bin + "/cortexctl");
  fs::copy_file(test::HostExe(), loose + "/cortex-plugin-host");
  fs::permissions(loose, fs::perms(0777), fs::perm_options::replace);
  fs::create_symlink(loose + "/cortex-plugin-host", lib + "/cortex-plugin-host");
  TempDir home;
  Daemon d(home, "", "router: {exploration: 0, seed: 1}\n", /*bundled=*/false);
  d.bin_dir = bin;
  test::Run r = test::RunCmd({bin + "/cortexd", "--check-config", "--config", d.config});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("unsafe permissions: " + loose + " (a folder above " + lib +
                       "/cortex-plugin-host) is writable by others (mode 0777)"),
            std::string::npos)
      << r.err;
  // Once the folder is safe, the same layout starts.
  fs::permissions(loose, fs::perms(0755), fs::perm_options::replace);
  d.AddPlugin(test::BenchPluginDir() + "/misbehave.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  test::Run ok = d.Ctl({"submit", "--wait", "please misbehave kindly"});
  EXPECT_EQ(ok.code, 0) << ok.out << ok.err << d.Log();
  // The folder turns unsafe while cortexd runs (the outside attack swapped the host then,
  // and a host restarted after a crash ran the swapped one): every later spawn is judged
  // again. A crash, then the next task needs a fresh host, which is refused.
  fs::permissions(loose, fs::perms(0777), fs::perm_options::replace);
  d.Ctl({"submit", "--wait", "please segfault"});
  const std::string marker = dir / "ran";
  test::WriteFile(loose + "/cortex-plugin-host.sh", "#!/bin/sh\ntouch " + marker + "\n");
  fs::permissions(loose + "/cortex-plugin-host.sh", fs::perms(0755), fs::perm_options::replace);
  fs::rename(loose + "/cortex-plugin-host.sh", loose + "/cortex-plugin-host");
  test::Run after = d.Ctl({"submit", "--wait", "please misbehave kindly"});
  EXPECT_NE(after.code, 0) << after.out;
  EXPECT_FALSE(fs::exists(marker)) << "the swapped host ran";
  EXPECT_TRUE(test::Eventually([&] {
    return d.Log().find("refusing to run the plugin host: unsafe permissions: " + loose) !=
           std::string::npos;
  })) << d.Log();
  EXPECT_TRUE(d.Alive());
  EXPECT_EQ(d.Stop(), 0);
}

// A symlink another user owns, in a sticky folder such as /tmp, was trusted for where it
// pointed; its owner may point it elsewhere at any time (the outside attack, with
// protected_symlinks off). Now the link itself must be root's or ours.
TEST(Trust, ASymlinkOfAnotherUserIsNotTrusted) {
  SKIP_UNLESS_SECOND_USER();
  TempDir dir;
  fs::permissions(dir.path(), fs::perms(0755), fs::perm_options::replace);
  const std::string shared = dir / "shared", host = dir / "host";
  fs::create_directories(shared);
  fs::permissions(shared, fs::perms(01777), fs::perm_options::replace);
  fs::copy_file(test::HostExe(), host);
  fs::create_symlink(host, shared + "/link");
  EXPECT_TRUE(CheckTrustedPath(shared + "/link", false).ok());  // root's link: trusted
  ASSERT_EQ(lchown((shared + "/link").c_str(), getpwnam("nobody")->pw_uid, -1), 0);
  Status st = CheckTrustedPath(shared + "/link", false);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find(shared + "/link is a symlink of another user"), std::string::npos)
      << st.message();
}

// ---- 3: the PostgreSQL password -------------------------------------------------------

TEST(Trust, RedactMessageMasksThePasswordWhateverLibpqQuotes) {
  const std::string bad = "postgresql://cortex:50%offS3cret@/cortex?host=/tmp/s";
  std::string m = RedactMessage("invalid percent-encoded token: \"50%offS3cret\"", bad);
  EXPECT_EQ(m, "invalid percent-encoded token: \"***\"");
  const std::string v6 = "postgresql://cortex:S3cret@[::1/cortex";
  m = RedactMessage("missing \"]\" in IPv6 host address in URI: \"" + v6 + "\"", v6);
  EXPECT_EQ(m.find("S3cret"), std::string::npos) << m;
  EXPECT_NE(m.find("postgresql://cortex:***@[::1/cortex"), std::string::npos) << m;
  // Percent-encoded in the URL, decoded in a message; and a password= parameter.
  m = RedactMessage("password p@ss/w rejected",
                    "postgresql://u:p%40ss%2Fw@h/db?password=other1&sslmode=require");
  EXPECT_EQ(m, "password *** rejected");
  EXPECT_EQ(RedactMessage("other1 other1", "postgresql://h/db?password=other1"), "*** ***");
  // A '/' in the password broke the URL's own redaction.
  EXPECT_EQ(RedactUrl("postgresql://u:a/b@h/db").find("a/b"), std::string::npos);
  // The outside attack's shapes: a '?' in the password; a percent-encoded key; a '@' or
  // '/' inside that libpq cuts at (quoting a piece as a host or a port); a space in a
  // parameter; a mistyped scheme.
  const std::vector<std::pair<std::string, std::string>> shapes = {
      {"postgresql://cortex:S3?cret@localhost/cortex", "cannot connect to {url}"},
      {"postgresql://cortex@/cortex?host=/tmp/s&%70assword=S3cret", "at {url}: refused"},
      {"postgresql://cortex:S3@cret@nohost.invalid/cortex",
       "could not translate host name \"cret@nohost.invalid\""},
      {"postgresql://cortex:S3/cret@localhost/cortex",
       "invalid integer value \"S3\" for connection option \"port\" ({url})"},
      {"postgresql://cortex@/cortex?host=/tmp/s&password=S3 cret", "{url}"},
      {"postgresql:/cortex:S3cret@localhost/cortex", "got '{url}'"},
      {"postgresql//cortex:S3cret@localhost/cortex", "got '{url}'"},
  };
  for (const auto& [url, shape] : shapes) {
    std::string text = shape;
    const size_t at = text.find("{url}");
    if (at != std::string::npos) text.replace(at, 5, url);
    for (const std::string& shown : {RedactMessage(text, url), RedactUrl(url)})
      for (const char* piece : {"S3?cret", "S3cret", "S3 cret", "cret", "\"S3\""})
        EXPECT_EQ(shown.find(piece), std::string::npos) << piece << " in: " << shown;
  }
}

TEST(Trust, ThePostgresPasswordIsInNoMessage) {
  // The issue's two, and two the outside attack found after the first fix (a '?' in the
  // password, a percent-encoded key): each fails to connect (no server on that socket).
  for (const std::string url :
       {"postgresql://cortex:50%offS3cret@/cortex?host=/tmp/s",
        "postgresql://cortex:S3cret@[::1/cortex",
        "postgresql://cortex:S3?cret@/cortex?host=/nonexistent",
        "postgresql://cortex@/cortex?host=/nonexistent&%70assword=S3cret"}) {
    TempDir dir;
    Daemon d(dir);
    d.UseStoreUrl(url);
    test::Run r =
        test::RunCmd({test::BinDir() + "/cortexd", "--check-config", "--config", d.config});
    EXPECT_EQ(r.code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("store.url"), std::string::npos) << r.err;
    EXPECT_EQ((r.out + r.err).find("cret"), std::string::npos) << r.err;
    EXPECT_FALSE(d.Start());
    EXPECT_NE(d.Log().find("PostgreSQL"), std::string::npos) << d.Log();
    EXPECT_EQ(d.Log().find("cret"), std::string::npos) << d.Log();
    // A detached start says why on the terminal and in its log: neither has it.
    r = test::RunCmd(
        {test::BinDir() + "/cortexd", "--config", d.config, "--log-file", dir / "detached.log"});
    EXPECT_EQ(r.code, 1) << r.out << r.err;
    EXPECT_EQ((r.out + r.err).find("cret"), std::string::npos) << r.err;
    EXPECT_EQ(test::ReadFile(dir / "detached.log").find("cret"), std::string::npos);
  }
}

// ---- 7: daemon.allow_group ------------------------------------------------------------

// The group's members reach the socket (the folder 0750, the socket 0660, both the
// group's); a user outside it still does not, and the folder stays private otherwise.
TEST(Trust, AllowGroupLetsItsMembersInAndNobodyElse) {
  SKIP_UNLESS_SECOND_USER();
  TempDir dir;
  fs::permissions(dir.path(), fs::perms(0755), fs::perm_options::replace);
  Daemon d(dir, "", "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n");
  std::string cfg = test::ReadFile(d.config);
  cfg.replace(cfg.find("workers: 4"), 10, "workers: 4, allow_group: nogroup");
  test::WriteFile(d.config, cfg);
  ASSERT_TRUE(d.Start()) << d.Log();
  const gid_t nogroup = getgrnam("nogroup")->gr_gid;
  const std::string folder = fs::path(d.socket).parent_path();
  EXPECT_EQ(StatOf(folder).st_mode & 07777, 0750u);
  EXPECT_EQ(StatOf(folder).st_gid, nogroup);
  EXPECT_EQ(StatOf(d.socket).st_mode & 07777, 0660u);
  EXPECT_EQ(StatOf(d.socket).st_gid, nogroup);
  const std::string ctl = test::BinDir() + "/cortexctl";
  test::Run r = As("nogroup", {ctl, "--socket", d.socket, "status"});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  r = As("nogroup", {ctl, "--socket", d.socket, "submit", "echo from a member"});
  EXPECT_EQ(r.code, 0) << r.err;
  // 'daemon' is not nobody's group: the folder keeps it out.
  r = As("daemon", {ctl, "--socket", d.socket, "status"});
  EXPECT_EQ(r.code, 3) << r.out << r.err;
  EXPECT_NE(r.err.find("ermission denied"), std::string::npos) << r.err;
  // Nothing else in the folder opened up: the plugin cache and the lock stay the daemon's.
  EXPECT_EQ(StatOf(folder + "/plugin-cache." + std::to_string(d.pid)).st_mode & 07777, 0700u);
  EXPECT_EQ(d.Stop(), 0);
  // Without allow_group the folder is made private again at the next start.
  cfg.replace(cfg.find(", allow_group: nogroup"), 22, "");
  test::WriteFile(d.config, cfg);
  ASSERT_TRUE(d.Start()) << d.Log();
  EXPECT_EQ(StatOf(folder).st_mode & 07777, 0700u);
  EXPECT_EQ(StatOf(d.socket).st_mode & 07777, 0600u);
  r = As("nogroup", {ctl, "--socket", d.socket, "status"});
  EXPECT_EQ(r.code, 3) << r.out << r.err;
  EXPECT_EQ(d.Stop(), 0);
}

// ---- 9: the smaller ones ---------------------------------------------------------------

// plugins.bundled: false leaves out the specialists, never the command plugin a config's
// experts are instances of; warnings about built-in rules name them as built-in.
TEST(Trust, BundledOffKeepsTheCommandPluginAndNamesBuiltInRulesAsSuch) {
  TempDir dir;
  Daemon d(dir,
           "experts:\n"
           "  - name: shell\n"
           "    plugin: command\n"
           "    run: [\"cat\"]\n",
           "router: {exploration: 0, seed: 1}\n", /*bundled=*/false);
  test::Run r = test::RunCmd({test::BinDir() + "/cortexd", "--check-config", "--config", d.config});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.err.find("warning: rule 'security-terms' (built-in) names expert 'security'"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("cortex.yaml: rule"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("(line"), std::string::npos) << r.err;
  ASSERT_TRUE(d.Start()) << d.Log();
  test::json experts = d.CtlJson({"experts"});
  std::vector<std::string> names;
  for (const auto& e : experts) names.push_back(e["name"].get<std::string>());
  EXPECT_EQ(names, std::vector<std::string>{"shell"}) << experts.dump();
  EXPECT_NE(d.Log().find("rule 'inventory-terms' (built-in) names expert 'inventory'"),
            std::string::npos)
      << d.Log();
  r = d.Ctl({"submit", "--wait", "--timeout", "30", "hello"});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_EQ(d.Stop(), 0);
}

// A start refused for its config says each error once and makes no store, lock or
// anything else of the store's.
TEST(Trust, AStartRefusedForItsConfigCreatesNoStoreAndSaysEachErrorOnce) {
  TempDir dir;
  struct Case {
    std::string yaml, error;
  };
  const std::vector<Case> cases = {
      {"rules:\n  - name: nested\n    match: [\"/(a)\\\\1/\"]\n    expert: security\n    boost: "
       "0.1\n",
       "rules.nested.match: bad regular expression"},
      {"experts:\n  - name: shell\n    plugin: command\n    run: []\n", "run"},
  };
  for (const auto& c : cases) {
    Daemon d(dir, c.yaml);
    EXPECT_FALSE(d.Start());
    EXPECT_EQ(d.exit_status, 1);
    const std::string log = d.Log();
    const size_t at = log.find(c.error);
    EXPECT_NE(at, std::string::npos) << log;
    // The error's line appears once (the start used to say it twice).
    const size_t eol = log.find('\n', at);
    const std::string line = log.substr(at, eol - at);
    size_t n = 0;
    for (size_t p = log.find(line); p != std::string::npos; p = log.find(line, p + 1)) ++n;
    EXPECT_EQ(n, 1u) << log;
    for (const char* f : {"", ".lock", "-wal", "-shm"})
      EXPECT_FALSE(fs::exists(d.store + f)) << d.store << f << " was created: " << log;
    fs::remove(d.log);
  }
  // A socket path too long for a Unix socket (found by the outside attack: refused only
  // once the store was made).
  Daemon d(dir);
  std::string c = test::ReadFile(d.config);
  c.replace(c.find(d.socket), d.socket.size(), dir / (std::string(120, 's') + "/c.sock"));
  test::WriteFile(d.config, c);
  EXPECT_FALSE(d.Start());
  EXPECT_NE(d.Log().find("daemon.socket: the path is too long"), std::string::npos) << d.Log();
  for (const char* f : {"", ".lock", "-wal", "-shm"})
    EXPECT_FALSE(fs::exists(d.store + f)) << d.store << f << " was created: " << d.Log();
}

// A folder others use (the outside attack gave /tmp/x; a careless operator, /run) given
// as the socket's was made 0700 (or 0750) under them, without a word. Now one that holds
// anything but cortexd's own files is refused, by --check-config and by a start, and left
// as it was; an empty one is made private as before.
TEST(Trust, AFolderOthersUseIsNotTakenOverForTheSocket) {
  TempDir dir;
  Daemon d(dir);
  const std::string run = dir / "run";
  fs::create_directories(run + "/other");
  test::WriteFile(run + "/other/pub", "hi");
  fs::permissions(run, fs::perms(0755), fs::perm_options::replace);
  const std::string why = run + " is open to others (mode 0755) and holds files not cortexd's";
  test::Run r = test::RunCmd({test::BinDir() + "/cortexd", "--check-config", "--config", d.config});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
  EXPECT_FALSE(d.Start());
  EXPECT_NE(d.Log().find(why), std::string::npos) << d.Log();
  EXPECT_EQ(StatOf(run).st_mode & 07777, 0755u);
  EXPECT_FALSE(fs::exists(d.store));
  fs::remove_all(run + "/other");
  ASSERT_TRUE(d.Start()) << d.Log();
  EXPECT_EQ(StatOf(run).st_mode & 07777, 0700u);
  EXPECT_EQ(d.Stop(), 0);
  // Its own files left in it (a socket, a lock, a plugin cache) are no reason to refuse.
  fs::permissions(run, fs::perms(0755), fs::perm_options::replace);
  ASSERT_TRUE(d.Start()) << d.Log();
  EXPECT_EQ(d.Stop(), 0);
}

// ---- 4: a wrong clock ---------------------------------------------------------------

// A wall clock that a test steps; the monotonic clock runs on untouched, as a real step
// leaves it.
class SteppedClock : public EnvWrapper {
 public:
  SteppedClock() : EnvWrapper(Env::Default()) {}
  double NowUnix() override { return EnvWrapper::NowUnix() + offset_.load(); }
  void Step(double by) { offset_ = offset_.load() + by; }

 private:
  std::atomic<double> offset_{0};
};

// cortexd's wall clock stepped back an hour while it ran (cortexd in this process, with a
// clock the test steps, and the real cortexctl on its socket). The tasks created after
// the step were stamped an hour earlier: `history --limit 3` showed the old ones instead,
// `history --follow` never printed them, and the task running across the step had a
// negative latency in `report` and ended before it began in `show`.
TEST(Trust, AClockSteppedBackHidesNoTaskAndMakesNoDurationNegative) {
  TempDir dir;
  Daemon files(dir, R"(experts:
  - {name: quick, plugin: command, run: ["true"], keywords: ["quick"]}
  - {name: slow, plugin: command, run: ["sleep", "2"], keywords: ["slow"], timeout: 60s}
)");
  Result<Config> cfg = LoadConfigFile(files.config);
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  SteppedClock clock;
  DaemonOptions opts;
  opts.config_path = files.config;
  opts.bundled_plugin_dir = test::BundledDir();
  opts.plugin_host = test::HostExe();
  opts.env = &clock;
  auto made = cortex::Daemon::Create(std::move(cfg).value(), opts);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  std::unique_ptr<cortex::Daemon> d = std::move(made).value();
  ASSERT_TRUE(d->Start().ok());
  std::thread serving([&] { EXPECT_TRUE(d->Run().ok()); });
  auto ctl = [&](std::vector<std::string> args) {
    args.push_back("--json");
    return files.Ctl(args).Json();
  };

  for (int i = 0; i < 3; ++i)
    ASSERT_EQ(files.Ctl({"submit", "quick before " + std::to_string(i), "--wait"}).code, 0);
  const std::string follow_out = dir / "follow.txt";
  const pid_t follower = fork();
  if (follower == 0) {
    FILE* f = freopen(follow_out.c_str(), "w", stdout);
    (void)f;
    const std::string bin = test::BinDir() + "/cortexctl";
    execl(bin.c_str(), bin.c_str(), "--socket", files.socket.c_str(), "history", "--follow",
          (char*)nullptr);
    _exit(127);
  }
  ASSERT_TRUE(test::Eventually([&] { return !test::ReadFile(follow_out).empty(); }));
  // The slow task is running when the clock steps back; two quick ones come after.
  const std::string slow = ctl({"submit", "slow across the step"})["id"];
  ASSERT_TRUE(files.WaitStatus([](const json& s) { return s["inflight"] == 1; }));
  clock.Step(-3600);
  std::vector<std::string> after = {slow};
  for (int i = 0; i < 2; ++i)
    after.push_back(ctl({"submit", "quick after " + std::to_string(i), "--wait"})["id"]);
  ASSERT_EQ(files.Ctl({"wait", slow, "--timeout", "30"}).code, 0);

  // The newest three are the three submitted last, newest first.
  json h = ctl({"history", "--limit", "3"});
  ASSERT_EQ(h.size(), 3u) << h;
  EXPECT_EQ(h[0]["id"], after[2]) << h;
  EXPECT_EQ(h[1]["id"], after[1]) << h;
  EXPECT_EQ(h[2]["id"], after[0]) << h;
  // The follower printed each as it ended.
  EXPECT_TRUE(test::Eventually([&] {
    const std::string out = test::ReadFile(follow_out);
    for (const auto& id : after)
      if (out.find(id.substr(0, 12)) == std::string::npos) return false;
    return true;
  })) << test::ReadFile(follow_out);
  kill(follower, SIGTERM);
  waitpid(follower, nullptr, 0);
  // Durations come from the monotonic clock: the slow task took its two seconds, not
  // minus an hour.
  json t = ctl({"show", slow});
  ASSERT_TRUE(t.is_object()) << t;
  const double took = IsoSecondsOf(t["updated_at"]) - IsoSecondsOf(t["created_at"]);
  EXPECT_GE(took, 1.5) << t;
  EXPECT_LT(took, 60) << t;
  json rep = ctl({"report"});
  ASSERT_TRUE(rep.is_object()) << rep;
  for (const char* k : {"latency_mean_s", "latency_max_s"})
    for (const auto& v : rep["buckets"][k]) {
      if (v.is_number()) {
        EXPECT_GE(v.get<double>(), 0) << k << ": " << rep["buckets"];
      }
    }

  d->RequestStop();
  serving.join();
}

// ---- 2, 5, 9a: what a plugin can do to its host, cortexd's log and its neighbours ------

const char* const kQuietRouter = "router: {exploration: 0, seed: 1}\ntraining: {online: false}\n";

// The attempts of task `id`, as `show --json` has them.
test::json AttemptsOf(const Daemon& d, const test::json& id) {
  return d.CtlJson({"show", id.get<std::string>()})["attempts"];
}

// RLIMIT_DATA alone left shared mappings out: a plugin mapped and touched 1 GiB of
// MAP_SHARED|MAP_ANONYMOUS memory under a 64 MiB limit. Now the limit bounds the host's
// whole address space, and going over it ends the task as a crash that says so.
TEST(Trust, SharedMemoryIsBoundedByTheMemoryLimitToo) {
  TempDir dir;
  Daemon d(dir, "", kQuietRouter, /*bundled=*/false,
           ", memory_limit: 64MiB, restart_backoff: 10ms");
  d.AddPlugin(test::TestPluginDir() + "/hostile.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  test::json experts = d.CtlJson({"experts"});
  ASSERT_EQ(experts.size(), 1u) << experts.dump();
  if (experts[0]["memory_limit"].is_null())
    GTEST_SKIP() << "sanitizer build: the host cannot enforce a memory limit under a sanitizer "
                    "runtime (it reserves terabytes of shadow memory)";
  test::json w = d.CtlJson({"submit", "hostile: share 1024", "--wait"});
  EXPECT_EQ(w["state"], "failed") << w.dump();
  test::json a = AttemptsOf(d, w["id"]);
  ASSERT_GE(a.size(), 1u) << w.dump();
  EXPECT_EQ(a[0]["outcome"]["kind"], "crash") << a.dump();
  EXPECT_NE(a[0]["outcome"].value("error", "").find("memory limit (64 MiB)"), std::string::npos)
      << a.dump();
  EXPECT_TRUE(d.Alive());
  // Its host comes back, and a mapping within the limit is the plugin's to use.
  w = d.CtlJson({"submit", "hostile: share 8", "--wait"});
  EXPECT_EQ(w["state"], "succeeded") << w.dump() << d.Log();
  EXPECT_EQ(d.Stop(), 0);
}

// A plugin printed 100k lines on stdout and stderr (cortexd.log grew by 6.3 MB) and a line
// that looked like one of cortexd's own. Now a host's output is cortexd's to log: each line
// under the expert's name, escaped, and at most so many a minute, the rest counted.
TEST(Trust, APluginsOutputIsPrefixedEscapedAndBoundedInTheLog) {
  TempDir dir;
  Daemon d(dir, "", kQuietRouter, /*bundled=*/false);
  d.AddPlugin(test::TestPluginDir() + "/hostile.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  const auto before = fs::file_size(d.log);
  test::json w = d.CtlJson({"submit", "hostile: flood 100000", "--wait"});
  EXPECT_EQ(w["state"], "succeeded") << w.dump();
  EXPECT_TRUE(test::Eventually([&] {
    return d.Log().find("of its stdout and stderr dropped") != std::string::npos;
  })) << d.Log().substr(0, 2000);
  const auto grown = fs::file_size(d.log) - before;
  EXPECT_LT(grown, 64u << 10) << "the log grew by " << grown << " bytes";
  const std::string log = d.Log();
  const std::string forged = "2026-12-07T05:31:00.000 cortexd[1] info: expert security";
  size_t forgeries = 0;
  for (const std::string& line : SplitLines(log)) {
    const size_t at = line.find(forged);
    if (at == std::string::npos) continue;
    ++forgeries;
    // Only ever inside a line of cortexd's own, after the expert's name.
    EXPECT_NE(at, 0u) << line;
    EXPECT_NE(line.substr(0, at).find("cortexd[" + std::to_string(d.pid) + "]"), std::string::npos)
        << line;
    EXPECT_NE(line.substr(0, at).find("expert hostile [stdout]: "), std::string::npos) << line;
  }
  EXPECT_EQ(forgeries, 1u) << log.substr(0, 4000);
  EXPECT_NE(log.find("expert hostile [stdout]: painted \\x1b[31mred\\x1b[0m\\x0dover"),
            std::string::npos)
      << log.substr(0, 4000);
  EXPECT_EQ(log.find('\x1b'), std::string::npos) << "a raw escape reached the log";
  EXPECT_NE(log.find("expert hostile [stderr]: a line on stderr"), std::string::npos)
      << log.substr(0, 4000);
  EXPECT_TRUE(d.Alive());
  EXPECT_EQ(d.Stop(), 0);
}

// A task that hung past its timeout (ignoring its cancel) got its host killed, and every
// other task running in that host was recorded as a `crash` of its own. Now the others are
// `interrupted` and run again, and only the hang counts as a crash.
TEST(Trust, AHungTaskCostsItsNeighboursARerunNotACrash) {
  TempDir dir;
  Daemon d(dir,
           "experts:\n  - name: misbehave\n    plugin: misbehave\n    keywords: [please]\n"
           "    timeout: 6s\n    delay_ms: 5000\n",
           kQuietRouter, /*bundled=*/false, ", quarantine_after: 2, restart_backoff: 10ms");
  d.AddPlugin(test::BenchPluginDir() + "/misbehave.so");
  ASSERT_TRUE(d.Start()) << d.Log();
  const test::json hung = d.CtlJson({"submit", "please hang hard"})["id"];
  // Past its timeout (6 s) and the grace that follows (1 s) its host is killed; the slow
  // task (5 s) is half way through then.
  sleep(4);
  test::json slow = d.CtlJson({"submit", "please be slow", "--wait", "--timeout", "60"});
  EXPECT_EQ(slow["state"], "succeeded") << slow.dump();
  test::json a = AttemptsOf(d, slow["id"]);
  ASSERT_EQ(a.size(), 2u) << a.dump();
  EXPECT_EQ(a[0]["outcome"]["kind"], "interrupted") << a.dump();
  EXPECT_NE(a[0]["outcome"].value("error", "").find("hung past its timeout"), std::string::npos)
      << a.dump();
  EXPECT_EQ(a[1]["expert"], "misbehave") << "run again on the same expert: " << a.dump();
  EXPECT_EQ(a[1]["outcome"]["kind"], "success") << a.dump();
  test::json h = d.CtlJson({"wait", hung.get<std::string>(), "--timeout", "30"});
  test::json ha = AttemptsOf(d, hung);
  ASSERT_GE(ha.size(), 1u) << ha.dump();
  EXPECT_EQ(ha[0]["outcome"]["kind"], "timeout") << ha.dump();
  // One crash (the hang), not two: with quarantine_after 2 it is not quarantined.
  test::json e = d.CtlJson({"experts"})[0];
  EXPECT_EQ(e["health"]["crashes"], 1) << e.dump();
  EXPECT_EQ(e["state"], "active") << e.dump();
  EXPECT_TRUE(d.Alive());
  EXPECT_EQ(d.Stop(), 0);
}

}  // namespace
}  // namespace cortex
