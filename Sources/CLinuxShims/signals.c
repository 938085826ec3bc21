#define _GNU_SOURCE
#include "simg_signals.h"

#include <errno.h>
#include <signal.h>
#include <string.h>

// Written only by the handler (and clear), read by polling threads. sig_atomic_t with volatile is
// what C guarantees for a handler; the value only ever goes 0 -> signal number, so a reader on
// another thread sees either 0 or the number, and a late view costs at most one more poll.
static volatile sig_atomic_t pending_signal = 0;

static void on_signal(int sig) {
    if (pending_signal == 0) pending_signal = sig;
    // SA_RESETHAND already restored SIG_DFL: a second Ctrl-C kills at once.
}

int simg_signals_ignore_write_signals(void) {
    struct sigaction ignore;
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    if (sigaction(SIGPIPE, &ignore, NULL) != 0) return -errno;
    if (sigaction(SIGXFSZ, &ignore, NULL) != 0) return -errno;
    return 0;
}

int simg_signals_install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESETHAND;  // deliberately no SA_RESTART
    // A signal ignored on entry stays ignored (the Unix etiquette: a non-interactive shell
    // starts background jobs with SIGINT ignored, nohup-like wrappers do the same).
    const int signals[2] = {SIGINT, SIGTERM};
    for (int i = 0; i < 2; i++) {
        struct sigaction old;
        if (sigaction(signals[i], NULL, &old) != 0) return -errno;
        if (old.sa_handler == SIG_IGN) continue;
        if (sigaction(signals[i], &action, NULL) != 0) return -errno;
    }
    return 0;
}

int simg_signals_pending(void) { return pending_signal; }

// Set by SIGUSR1, taken (cleared) by the progress meter: qemu-img's way to ask a command run
// without -p where it is (util/qemu-progress.c's dummy meter).
static volatile sig_atomic_t progress_requested = 0;

static void on_progress_signal(int sig) {
    (void)sig;
    progress_requested = 1;
}

int simg_signals_install_progress(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_progress_signal;
    sigfillset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &action, NULL) != 0) return -errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return 0;
}

int simg_signals_progress_requested(void) { return progress_requested != 0; }

int simg_signals_take_progress_request(void) {
    if (!progress_requested) return 0;
    progress_requested = 0;
    return 1;
}

void simg_signals_clear(void) { pending_signal = 0; }

void simg_signals_reraise(int sig) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = SIG_DFL;
    sigemptyset(&action.sa_mask);
    sigaction(sig, &action, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
}
