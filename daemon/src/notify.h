// Tells a service manager (systemd, Type=notify) where cortexd is in its life, through
// sd_notify(3): each call is a no-op when NOTIFY_SOCKET is unset or cortexd was built
// without libsystemd. Called from the main and loader threads; sd_notify keeps no state.
#pragma once

#include <string>

namespace cortex {

// Serving: the socket accepts and every loaded expert is registered.
void NotifyReady();
// A SIGHUP reload has begun; NotifyReady() again when it is done.
void NotifyReloading();
// Stopping: intake is closed, running attempts are being finished.
void NotifyStopping();
// A line for `systemctl status`.
void NotifyStatus(const std::string& status);

}  // namespace cortex
