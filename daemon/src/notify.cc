#include "notify.h"

#ifdef CORTEX_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#include <time.h>
#endif

namespace cortex {

#ifdef CORTEX_HAVE_SYSTEMD
namespace {
// unset_environment=0: every later notification goes to the same socket. Plugin hosts
// never see NOTIFY_SOCKET (they get only plugins.env), so they cannot speak for cortexd.
void Send(const std::string& msg) { (void)sd_notify(0, msg.c_str()); }
}  // namespace

void NotifyReady() { Send("READY=1\nSTATUS=serving"); }

void NotifyReloading() {
  // MONOTONIC_USEC lets a newer systemd (Type=notify-reload, 253+) match the reload to
  // its request; older ones ignore it.
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  long long usec = static_cast<long long>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
  Send("RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC=" + std::to_string(usec));
}

void NotifyStopping() { Send("STOPPING=1\nSTATUS=stopping"); }

void NotifyStatus(const std::string& status) { Send("STATUS=" + status); }
#else
void NotifyReady() {}
void NotifyReloading() {}
void NotifyStopping() {}
void NotifyStatus(const std::string&) {}
#endif

}  // namespace cortex
