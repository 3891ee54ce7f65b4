// Cortex as a Unix package: the man pages (generated, well-formed, in step with the
// code), the systemd user unit (systemd-analyze verify, installed with the right paths)
// and readiness notification through a NOTIFY_SOCKET the test owns.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <cstring>
#include <set>
#include <sstream>

#include "cortex/config.h"
#include "testutil.h"

extern char** environ;

namespace cortex {
namespace {

using test::Daemon;
using test::ReadFile;
using test::RunCmd;
using test::TempDir;
using test::WriteFile;
namespace fs = std::filesystem;

const std::string kManDir = CORTEX_TEST_MAN_DIR;
const std::string kUnit = CORTEX_TEST_UNIT_FILE;

// A program on the tests' PATH, or "" when it is not installed.
std::string Which(const std::string& name) {
  for (const char* dir : {"/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"}) {
    std::string p = std::string(dir) + "/" + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

// A page's roff without the zero-width escapes scdoc puts after periods, so a term such
// as `daemon.workers` reads as written (`\fBdaemon.workers\fR`).
std::string Roff(const std::string& page) {
  std::string s = ReadFile(page);
  for (size_t i; (i = s.find("\\&")) != std::string::npos;) s.erase(i, 2);
  return s;
}

bool HasBold(const std::string& roff, const std::string& term) {
  return roff.find("\\fB" + term + "\\fR") != std::string::npos ||
         roff.find("\\fB" + term + " ") != std::string::npos;
}

// The entries of a CLI11 help section ("Subcommands:", "Options:"): the first column of
// each indented line after the heading, up to the next blank or unindented line.
std::vector<std::string> HelpSection(const std::string& help, const std::string& heading) {
  std::vector<std::string> out;
  std::istringstream in(help);
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    std::string lower = line;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower.rfind(heading + ":", 0) == 0) {
      inside = true;
      continue;
    }
    if (!inside) continue;
    if (line.empty() || !std::isspace(static_cast<unsigned char>(line[0]))) {
      inside = false;
      continue;
    }
    size_t b = line.find_first_not_of(" \t");
    size_t e = line.find("  ", b);  // the description is two or more spaces on
    out.push_back(line.substr(b, e == std::string::npos ? std::string::npos : e - b));
  }
  return out;
}

// Every --long option named in a help text's Options section, --help aside.
std::set<std::string> HelpOptions(const std::string& help) {
  std::set<std::string> out;
  for (const std::string& col : HelpSection(help, "options")) {
    for (size_t i = col.find("--"); i != std::string::npos; i = col.find("--", i + 2)) {
      size_t e = col.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-", i + 2);
      std::string opt = col.substr(i, e == std::string::npos ? std::string::npos : e - i);
      if (opt != "--help") out.insert(opt);
    }
  }
  return out;
}

std::vector<std::string> HelpSubcommands(const std::string& help) {
  std::vector<std::string> out;
  for (const std::string& col : HelpSection(help, "subcommands"))
    out.push_back(col.substr(0, col.find(' ')));
  return out;
}

// ---- man pages ------------------------------------------------------------------------

#define SKIP_WITHOUT_MAN_PAGES()                                                            \
  if (!CORTEX_TEST_HAVE_MAN_PAGES)                                                          \
  GTEST_SKIP() << "scdoc was not found when cortex was configured (Debian: scdoc), so the " \
                  "man pages were not generated"

TEST(Unix, ManPagesAreGeneratedAndWellFormed) {
  SKIP_WITHOUT_MAN_PAGES();
  std::string groff = Which("groff");
  if (groff.empty()) GTEST_SKIP() << "groff is not installed (Debian: groff-base)";
  for (const char* page : {"man1/cortexctl.1", "man8/cortexd.8", "man5/cortex.yaml.5"}) {
    SCOPED_TRACE(page);
    std::string path = kManDir + "/" + page;
    ASSERT_TRUE(fs::exists(path));
    std::string roff = ReadFile(path);
    EXPECT_NE(roff.find(".TH"), std::string::npos);
    for (const char* section : {".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH SEE ALSO"})
      EXPECT_NE(roff.find(section), std::string::npos) << section;
    // -ww: every warning; -z: format without output. A well-formed page says nothing.
    test::Run r = RunCmd({groff, "-man", "-Tutf8", "-ww", "-z", path});
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(r.err, "");
  }
  // What the brief of each page promises.
  std::string d = Roff(kManDir + "/man8/cortexd.8");
  for (const char* s :
       {".SH OPTIONS", ".SH SIGNALS", ".SH EXIT STATUS", ".SH ENVIRONMENT", ".SH FILES", "SIGHUP",
        "SIGTERM", "NOTIFY_SOCKET", "/etc/cortex/cortex.yaml"})
    EXPECT_NE(d.find(s), std::string::npos) << "cortexd.8 lacks " << s;
  std::string c = Roff(kManDir + "/man1/cortexctl.1");
  for (const char* s : {".SH EXIT STATUS", ".SH ENVIRONMENT", ".SH FILES", "CORTEX_SOCKET",
                        "CORTEX_TIMEOUT", ".SH DEADLINES"})
    EXPECT_NE(c.find(s), std::string::npos) << "cortexctl.1 lacks " << s;
  std::string y = Roff(kManDir + "/man5/cortex.yaml.5");
  EXPECT_NE(y.find(".SH EXAMPLE"), std::string::npos);
}

// Every command and option `cortexctl --help` (and each command's --help) lists is in
// cortexctl(1): a command added to the code without its page fails here.
TEST(Unix, CortexctlPageNamesEveryCommandAndOption) {
  SKIP_WITHOUT_MAN_PAGES();
  std::string roff = Roff(kManDir + "/man1/cortexctl.1");
  std::string ctl = test::BinDir() + "/cortexctl";
  test::Run top = RunCmd({ctl, "--help"});
  ASSERT_EQ(top.code, 0) << top.err;
  std::vector<std::string> commands = HelpSubcommands(top.out);
  ASSERT_GE(commands.size(), 10u) << "could not read the commands from:\n" << top.out;
  std::set<std::string> options = HelpOptions(top.out);
  for (const std::string& cmd : commands) {
    EXPECT_TRUE(HasBold(roff, cmd)) << "cortexctl.1 does not document the command '" << cmd << "'";
    test::Run sub = RunCmd({ctl, cmd, "--help"});
    EXPECT_EQ(sub.code, 0) << cmd << ": " << sub.err;
    for (const std::string& o : HelpOptions(sub.out)) options.insert(o);
    for (const std::string& nested : HelpSubcommands(sub.out))
      EXPECT_TRUE(HasBold(roff, cmd + " " + nested))
          << "cortexctl.1 does not document the command '" << cmd << " " << nested << "'";
  }
  ASSERT_FALSE(options.empty());
  for (const std::string& o : options)
    EXPECT_TRUE(HasBold(roff, o)) << "cortexctl.1 does not document the option " << o;
}

// Every section and setting of the schema and of `cortexd --print-config` is in
// cortex.yaml(5), each setting under its dotted name (the name errors use).
TEST(Unix, ConfigPageNamesEverySectionAndSetting) {
  SKIP_WITHOUT_MAN_PAGES();
  std::string roff = Roff(kManDir + "/man5/cortex.yaml.5");
  std::set<std::string> sections = {"daemon",   "store", "plugins", "router",
                                    "training", "rules", "experts"};
  std::set<std::string> keys;
  for (const std::string& k : SettingKeys()) keys.insert(k);
  test::Run r = RunCmd({test::BinDir() + "/cortexd", "--print-config"});
  ASSERT_EQ(r.code, 0) << r.err;
  YAML::Node root = YAML::Load(r.out);
  ASSERT_TRUE(root.IsMap()) << r.out;
  for (const auto& kv : root) {
    std::string section = kv.first.as<std::string>();
    sections.insert(section);
    if (kv.second.IsMap())
      for (const auto& k : kv.second) keys.insert(section + "." + k.first.as<std::string>());
  }
  for (const std::string& s : sections) {
    std::string upper = s;
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    EXPECT_NE(roff.find(".SH " + upper + "\n"), std::string::npos)
        << "cortex.yaml.5 has no section for '" << s << "'";
  }
  ASSERT_GE(keys.size(), 20u);
  for (const std::string& k : keys)
    EXPECT_TRUE(HasBold(roff, k)) << "cortex.yaml.5 does not document " << k;
}

// ---- systemd unit ---------------------------------------------------------------------

// `systemd-analyze --user verify` of `unit` (no systemd needs to run): its exit status and
// everything it said. With `manpath`, the unit's Documentation= pages are looked up there.
test::Run VerifyUnit(const std::string& analyze, const std::string& unit,
                     const std::string& manpath = "") {
  TempDir runtime;  // the user manager it simulates wants a runtime folder
  chmod(runtime.path().c_str(), 0700);
  std::vector<std::string> env = test::BaseEnv();
  env.push_back("XDG_RUNTIME_DIR=" + runtime.path());
  if (!manpath.empty()) env.push_back("MANPATH=" + manpath);
  test::Run r =
      RunCmd({analyze, "--user", "verify", manpath.empty() ? "--man=no" : "--man=yes", unit}, 120,
             "", env);
  r.out += r.err;
  return r;
}

TEST(Unix, SystemdUnitVerifiesAndABrokenOneDoesNot) {
  std::string analyze = Which("systemd-analyze");
  if (analyze.empty()) GTEST_SKIP() << "systemd-analyze is not installed (Debian: systemd)";
  std::string unit = ReadFile(kUnit);
  ASSERT_FALSE(unit.empty()) << kUnit;
  // The build-tree copy runs the build's cortexd, as the installed one runs the installed.
  std::vector<std::string> lines = {CORTEX_TEST_HAVE_SYSTEMD ? "Type=notify\n" : "Type=exec\n",
                                    "ExecStart=" + test::BinDir() + "/cortexd --foreground\n",
                                    "ExecReload=/bin/kill -HUP $MAINPID\n",
                                    "KillMode=mixed\n",
                                    "Restart=on-failure\n",
                                    "NoNewPrivileges=yes\n",
                                    "WantedBy=default.target\n"};
  for (const std::string& line : lines)
    EXPECT_NE(unit.find(line), std::string::npos) << "the unit lacks " << line;

  test::Run ok = VerifyUnit(analyze, kUnit, CORTEX_TEST_HAVE_MAN_PAGES ? kManDir : "");
  EXPECT_EQ(ok.code, 0) << ok.out;
  EXPECT_EQ(ok.out, "") << "systemd-analyze had something to say about " << kUnit;

  // The check has teeth: a misspelt setting is reported, a missing program fails it.
  TempDir dir;
  std::string typo = unit;
  typo.replace(typo.find("Restart=on-failure\n"), 19, "Restart=on-falure\n");
  WriteFile(dir / "typo/cortexd.service", typo);
  test::Run bad = VerifyUnit(analyze, dir / "typo/cortexd.service");
  EXPECT_NE(bad.out.find("on-falure"), std::string::npos) << bad.out;
  std::string missing = unit;
  missing.replace(missing.find(test::BinDir() + "/cortexd"), test::BinDir().size() + 8,
                  dir / "nowhere/cortexd");
  WriteFile(dir / "missing/cortexd.service", missing);
  bad = VerifyUnit(analyze, dir / "missing/cortexd.service");
  EXPECT_NE(bad.code, 0) << bad.out;
}

// `cmake --install` to a fresh prefix puts the unit (pointing into that prefix) and the
// man pages where systemd and man look for them.
TEST(Unix, InstallPutsUnitAndManPagesInPlace) {
  TempDir prefix;
  test::Run r = RunCmd(
      {CORTEX_TEST_CMAKE, "--install", CORTEX_TEST_BUILD_DIR, "--prefix", prefix.path()}, 300);
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  std::string unit = ReadFile(prefix / "lib/systemd/user/cortexd.service");
  EXPECT_NE(unit.find("ExecStart=" + prefix.path() + "/bin/cortexd --foreground\n"),
            std::string::npos)
      << unit;
  EXPECT_EQ(unit.find("@prefix@"), std::string::npos);
  EXPECT_TRUE(fs::exists(prefix / "bin/cortexd"));
  if (std::string analyze = Which("systemd-analyze"); !analyze.empty()) {
    test::Run v = VerifyUnit(analyze, prefix / "lib/systemd/user/cortexd.service",
                             CORTEX_TEST_HAVE_MAN_PAGES ? prefix / "share/man" : "");
    EXPECT_EQ(v.code, 0) << v.out;
    EXPECT_EQ(v.out, "");
  }
  if (!CORTEX_TEST_HAVE_MAN_PAGES) return;
  for (const char* page : {"man1/cortexctl.1", "man8/cortexd.8", "man5/cortex.yaml.5"})
    EXPECT_TRUE(fs::exists(prefix / ("share/man/" + std::string(page)))) << page;
  if (std::string man = Which("man"); !man.empty()) {
    std::vector<std::string> env = test::BaseEnv();
    env.push_back("MANPATH=" + prefix / "share/man");
    test::Run w = RunCmd({man, "-w", "5", "cortex.yaml"}, 60, "", env);
    EXPECT_EQ(w.code, 0) << w.err;
    EXPECT_EQ(w.out, prefix / "share/man/man5/cortex.yaml.5\n");
  }
}

// ---- readiness ------------------------------------------------------------------------

// The service manager's end of NOTIFY_SOCKET: a datagram socket that also learns each
// sender's pid (systemd takes READY=1 only from the main process).
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    ok_ = fd_ >= 0 && bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    int one = 1;
    ok_ = ok_ && setsockopt(fd_, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) == 0;
  }
  ~NotifySocket() {
    if (fd_ >= 0) close(fd_);
  }
  bool ok() const { return ok_; }

  // Reads messages until one has the line `want` (a message is lines KEY=VALUE), for up
  // to `timeout_s`; stops early if `pid` exits. Every message read is kept in `log`.
  bool WaitFor(const std::string& want, pid_t pid, double timeout_s, std::string* message) {
    int64_t deadline = experts::NowUnixMs() + static_cast<int64_t>(timeout_s * 1000);
    while (experts::NowUnixMs() < deadline) {
      struct pollfd p = {fd_, POLLIN, 0};
      if (poll(&p, 1, 100) == 1) {
        char buf[4096];
        char control[CMSG_SPACE(sizeof(struct ucred))];
        struct iovec iov = {buf, sizeof buf - 1};
        struct msghdr m = {};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = control;
        m.msg_controllen = sizeof control;
        ssize_t n = recvmsg(fd_, &m, 0);
        if (n < 0) continue;
        std::string msg(buf, static_cast<size_t>(n));
        pid_t sender = -1;
        for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
          if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
            struct ucred cred;
            std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
            sender = cred.pid;
          }
        log += "[" + std::to_string(sender) + "] " + msg + "\n";
        EXPECT_EQ(sender, pid) << "a notification from a process other than cortexd: " << msg;
        std::istringstream lines(msg);
        for (std::string l; std::getline(lines, l);)
          if (l == want) {
            *message = msg;
            return true;
          }
        continue;
      }
      if (waitpid(pid, nullptr, WNOHANG) == pid) return false;  // died before saying it
    }
    return false;
  }

  std::string log;

 private:
  std::string path_;
  int fd_ = -1;
  bool ok_ = false;
};

TEST(Unix, ReadinessReloadAndStopAreNotified) {
  if (!CORTEX_TEST_HAVE_SYSTEMD)
    GTEST_SKIP() << "cortexd was built without libsystemd (Debian: libsystemd-dev), so it "
                    "sends no sd_notify messages";
  TempDir dir;
  Daemon d(dir);
  NotifySocket ns(dir / "notify.sock");
  ASSERT_TRUE(ns.ok()) << strerror(errno);

  // What systemd gives a Type=notify service: NOTIFY_SOCKET in its environment.
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "NOTIFY_SOCKET=", 14) != 0) env.push_back(*e);
  env.push_back("NOTIFY_SOCKET=" + (dir / "notify.sock"));
  std::vector<char*> envp;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string exe = test::BinDir() + "/cortexd";
  std::vector<std::string> args = {exe, "--foreground", "--config", d.config};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  d.pid = fork();
  ASSERT_GE(d.pid, 0);
  if (d.pid == 0) {
    FILE* f = freopen(d.log.c_str(), "a", stderr);
    (void)f;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    execve(exe.c_str(), argv.data(), envp.data());
    _exit(127);
  }

  // Ready means serving: the moment READY=1 arrives, status answers, from this cortexd.
  std::string msg;
  ASSERT_TRUE(ns.WaitFor("READY=1", d.pid, 120, &msg)) << ns.log << d.Log();
  test::Run st = d.Ctl({"status", "--json"}, 10);
  ASSERT_EQ(st.code, 0) << st.err << d.Log();
  EXPECT_EQ(st.Json().value("pid", -1), d.pid);

  // SIGHUP: RELOADING=1 (with the time, for Type=notify-reload), then READY=1 again.
  kill(d.pid, SIGHUP);
  ASSERT_TRUE(ns.WaitFor("RELOADING=1", d.pid, 60, &msg)) << ns.log << d.Log();
  EXPECT_NE(msg.find("MONOTONIC_USEC="), std::string::npos) << msg;
  ASSERT_TRUE(ns.WaitFor("READY=1", d.pid, 60, &msg)) << ns.log << d.Log();
  EXPECT_EQ(d.Ctl({"status", "--json"}, 10).code, 0);

  // SIGTERM: STOPPING=1 before it exits, and a clean exit.
  kill(d.pid, SIGTERM);
  ASSERT_TRUE(ns.WaitFor("STOPPING=1", d.pid, 60, &msg)) << ns.log << d.Log();
  EXPECT_EQ(d.Stop(0, 60), 0) << d.Log();
}

}  // namespace
}  // namespace cortex
