/* A small stateful HTTP server for the Kubernetes tests: GET / answers
 * "count=N boot=BOOTID\n", N counting the requests served by this process
 * and BOOTID random per process start, so a test tells kept state (same boot,
 * next count) from a cold start (new boot, count=1). Each request prints
 * "request N" on stdout, flushed, for the container's log. Listens on
 * 0.0.0.0:PORT (argv[1], default 8080). One connection at a time; the answer
 * closes the connection. Static (gcc -static), no libc locale or DNS. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void boot_id(char out[17]) {
    unsigned char raw[8] = {0};
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0 || read(fd, raw, sizeof raw) != (ssize_t)sizeof raw) {
        perror("counter: /dev/urandom");
        exit(1);
    }
    close(fd);
    for (int i = 0; i < 8; i++)
        snprintf(out + 2 * i, 3, "%02x", raw[i]);
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 8080;
    char boot[17];
    boot_id(boot);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);

    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(srv, 64) < 0) {
        perror("counter: listen");
        return 1;
    }
    printf("listening on %d boot=%s\n", port, boot);
    fflush(stdout);

    unsigned long count = 0;
    for (;;) {
        int c = accept(srv, NULL, NULL);
        if (c < 0)
            continue;
        char req[4096];
        size_t got = 0;
        /* Read the request head (up to the blank line or 4 KiB). */
        while (got < sizeof req - 1) {
            ssize_t n = read(c, req + got, sizeof req - 1 - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += (size_t)n;
            req[got] = 0;
            if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
                break;
        }
        req[got] = 0;
        char head[256], body[128];
        if (strncmp(req, "GET / ", 6) == 0) {
            count++;
            int blen = snprintf(body, sizeof body, "count=%lu boot=%s\n", count, boot);
            int hlen = snprintf(head, sizeof head,
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                "Content-Length: %d\r\nConnection: close\r\n\r\n",
                                blen);
            write_all(c, head, (size_t)hlen);
            write_all(c, body, (size_t)blen);
            printf("request %lu\n", count);
            fflush(stdout);
        } else if (got > 0) {
            const char *nf = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            write_all(c, nf, strlen(nf));
        }
        close(c);
    }
}
