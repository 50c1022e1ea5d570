/*
 * holder: the first process of an app container managed by the pod-activator
 * sidecar.
 *
 * The runtime (containerd, runc, kubelet) restarts a container whose first
 * process exits, which would throw the checkpoint away. So the container's
 * first process is this holder, with the app as its child; the holder stays
 * while the app is checkpointed (its processes gone) and restored.
 *
 *   holder --name NAME [--control DIR] -- CMD [ARG...]
 *
 * It serves the sidecar on DIR/NAME.sock (SOCK_SEQPACKET, one message per
 * request, NUL-separated fields):
 *
 *   manage              -> "app PID"   the sidecar now decides about app exits
 *   start               -> "app PID"   start the app again (a cold start)
 *   exec ARGV... +fds   -> "exec PID"  run ARGV here (CRIU, in the container's
 *                                      namespaces and cgroup) with the passed
 *                                      fds as 3, 4, ...; a restored app is
 *                                      then our child (CRIU's restore-sibling)
 *   exit STATUS         -> the app really ended: exit with STATUS
 *   release             -> unmanaged again: the next app exit ends the holder
 *
 * and tells it "exited PID WAITSTATUS" whenever the app's root process ends.
 * While unmanaged (no sidecar yet, or a bad annotation), it is a plain init:
 * it forwards signals and exits with the app's status. Once managed, an app
 * exit ends the holder only when the sidecar says so (a checkpoint kills the
 * app; that is not the end) or when the container is being stopped
 * (SIGTERM/SIGINT). Written in C, static: it runs in any image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_MESSAGE 8192
#define MAX_FDS 8
#define MAX_ARGS 64

static char **app_argv;
static pid_t app_pid;
static int managed;
static int stopping;
static int sidecar = -1;
static sigset_t handled;

static void say(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "holder: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static int exit_code(int status)
{
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

/* Fork a child with the default signal state that runs argv; fds, if any,
 * become 3, 4, ... in it. */
static pid_t run(char **argv, const int *fds, int nfds, int new_session)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	sigprocmask(SIG_UNBLOCK, &handled, NULL);
	if (new_session)
		setsid(); /* the app leads its own session: CRIU dumps a clean tree */
	int moved[MAX_FDS];
	for (int i = 0; i < nfds; i++) /* above any target number first */
		moved[i] = fcntl(fds[i], F_DUPFD, 3 + MAX_FDS);
	for (int i = 0; i < nfds; i++)
		if (moved[i] < 0 || dup2(moved[i], 3 + i) < 0)
			_exit(127);
	close_range(3 + nfds, ~0U, 0);
	execvp(argv[0], argv);
	say("cannot run %s: %s", argv[0], strerror(errno));
	_exit(127);
}

static void reply(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (sidecar >= 0 && send(sidecar, buf, n, MSG_NOSIGNAL) < 0) {
		close(sidecar); /* it went away; a new one can connect */
		sidecar = -1;
	}
}

static void start_app(void)
{
	app_pid = run(app_argv, NULL, 0, 1);
	if (app_pid < 0) {
		say("cannot fork the app: %s", strerror(errno));
		app_pid = 0;
	}
}

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (pid != app_pid)
			continue; /* CRIU, or an orphan we reaped as subreaper */
		app_pid = 0;
		if (!managed || stopping)
			exit(exit_code(status));
		reply("exited %d %d", pid, status);
	}
}

static void on_signal(int sig)
{
	if (sig == SIGCHLD) {
		reap();
		return;
	}
	if (sig == SIGTERM || sig == SIGINT)
		stopping = 1;
	if (app_pid > 0)
		kill(app_pid, sig);
	else if (stopping)
		exit(0); /* scaled down, or never started: nothing to wait for */
}

static void on_request(void)
{
	char buf[MAX_MESSAGE + 1];
	char control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
	struct iovec iov = {buf, MAX_MESSAGE};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = control, .msg_controllen = sizeof control};
	ssize_t n = recvmsg(sidecar, &msg, MSG_CMSG_CLOEXEC);
	if (n <= 0) {
		close(sidecar);
		sidecar = -1;
		return;
	}
	buf[n] = '\0';
	int fds[MAX_FDS], nfds = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++)
				if (nfds < MAX_FDS)
					memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	char *args[MAX_ARGS + 1];
	int nargs = 0;
	for (char *p = buf; p < buf + n && nargs < MAX_ARGS; p += strlen(p) + 1)
		args[nargs++] = p;
	args[nargs] = NULL;

	if (nargs == 0) {
		reply("error empty request");
	} else if (!strcmp(args[0], "manage")) {
		managed = 1;
		reply("app %d", app_pid);
	} else if (!strcmp(args[0], "release")) {
		managed = 0;
		reply("released");
		if (app_pid == 0 && !stopping)
			start_app(); /* unmanaged means plainly running */
	} else if (!strcmp(args[0], "start")) {
		if (app_pid == 0)
			start_app();
		reply("app %d", app_pid);
	} else if (!strcmp(args[0], "exec") && nargs > 1) {
		pid_t pid = run(args + 1, fds, nfds, 0);
		reply("exec %d", pid < 0 ? 0 : pid);
	} else if (!strcmp(args[0], "exit") && nargs > 1) {
		exit(atoi(args[1]));
	} else {
		reply("error unknown request %s", args[0]);
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
}

static int listen_on(const char *dir, const char *name)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	mkdir(dir, 0700);
	if ((size_t)snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s.sock", dir, name) >=
	    sizeof addr.sun_path) {
		say("control path %s/%s.sock is too long", dir, name);
		return -1;
	}
	unlink(addr.sun_path); /* left by an earlier run of this container */
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0) {
		say("cannot listen on %s: %s", addr.sun_path, strerror(errno));
		return -1;
	}
	chmod(addr.sun_path, 0600);
	return fd;
}

static void usage(void)
{
	fprintf(stderr, "usage: holder --name NAME [--control DIR] -- CMD [ARG...]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *name = NULL, *dir = "/pod-activator/run";
	int i = 1;
	for (; i < argc && strcmp(argv[i], "--"); i++) {
		if (!strcmp(argv[i], "--name") && i + 1 < argc)
			name = argv[++i];
		else if (!strcmp(argv[i], "--control") && i + 1 < argc)
			dir = argv[++i];
		else
			usage();
	}
	if (!name || i + 1 >= argc || strchr(name, '/'))
		usage();
	app_argv = argv + i + 1;

	/* Orphans of the app, and the app CRIU restores, come to us to reap. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	sigemptyset(&handled);
	int forwarded[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
	for (size_t k = 0; k < sizeof forwarded / sizeof *forwarded; k++)
		sigaddset(&handled, forwarded[k]);
	sigprocmask(SIG_BLOCK, &handled, NULL);
	int signals = signalfd(-1, &handled, SFD_CLOEXEC);
	/* Without a control socket the app still runs, unmanaged, as it would
	 * without us: a broken sidecar never takes the app down. */
	int listener = listen_on(dir, name);
	start_app();
	if (app_pid == 0)
		return 127;

	for (;;) {
		struct pollfd fds[3] = {{signals, POLLIN, 0}, {listener, POLLIN, 0},
					{sidecar, POLLIN, 0}};
		if (poll(fds, 3, -1) < 0 && errno != EINTR)
			return 1;
		if (fds[0].revents & POLLIN) {
			struct signalfd_siginfo info;
			if (read(signals, &info, sizeof info) == sizeof info)
				on_signal((int)info.ssi_signo);
		}
		if (fds[1].revents & POLLIN) {
			int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
			if (fd >= 0) {
				if (sidecar >= 0)
					close(sidecar); /* the newest sidecar wins */
				sidecar = fd;
			}
		}
		if (sidecar >= 0 && (fds[2].revents & (POLLIN | POLLHUP | POLLERR)))
			on_request();
	}
}
