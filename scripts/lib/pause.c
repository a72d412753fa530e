/*
 * The CRI sandbox ("pause") container's program, for a private containerd without internet:
 * the CRI plugin needs a sandbox image and cannot pull registry.k8s.io's, so
 * scripts/containerd-private.sh --cri builds this (cc -static) into a local image.
 *
 * It holds the pod's namespaces open and does nothing else: as PID 1 of the pod's PID
 * namespace it reaps whatever children get reparented to it, and it exits 0 on SIGTERM or
 * SIGINT (PID 1 has no default signal actions, so without handlers StopPodSandbox would have
 * to wait for SIGKILL).
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction sa = {0};
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = quit;
    if (sigaction(SIGTERM, &sa, NULL) != 0 || sigaction(SIGINT, &sa, NULL) != 0)
        return 1;
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) != 0)
        return 1;
    for (;;)
        pause();
}
