// Interruption by SIGINT/SIGTERM, for DiskIO's Interruption. The handler only stores the
// signal number (async-signal-safe); long loops poll it and stop cleanly.
#ifndef SIMG_SIGNALS_H
#define SIMG_SIGNALS_H

/// Ignores SIGPIPE and SIGXFSZ, so that a closed pipe or a file size limit makes write() fail
/// with EPIPE/EFBIG instead of killing the process. Returns 0 or -errno.
int simg_signals_ignore_write_signals(void);

/// Installs the SIGINT and SIGTERM handler (without SA_RESTART: blocking calls see EINTR and
/// the callers retry them, then poll). The handler resets its signal to the default
/// disposition, so a second Ctrl-C kills at once. A signal already ignored on entry (a
/// background job of a non-interactive shell) is left ignored. Returns 0 or -errno.
int simg_signals_install(void);

/// The first interrupting signal received since install (or the last clear), or 0.
int simg_signals_pending(void);

/// Installs the SIGUSR1 handler of qemu-img's commands with a progress meter (SA_RESTART;
/// the handler only sets a flag) and unblocks SIGUSR1 on the calling thread. Returns 0 or -errno.
int simg_signals_install_progress(void);

/// 1 if SIGUSR1 arrived and was not taken yet (it stays pending), else 0.
int simg_signals_progress_requested(void);

/// 1 if SIGUSR1 arrived since the last call (and forgets it), else 0.
int simg_signals_take_progress_request(void);

/// Forgets a pending signal (tests only).
void simg_signals_clear(void);

/// Restores the default disposition of `sig`, unblocks it and raises it: the process dies of
/// it as if no handler had been installed. Returns only if the signal does not kill.
void simg_signals_reraise(int sig);

#endif
