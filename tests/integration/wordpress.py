"""WordPress on nginx + php-fpm in one pod, its MariaDB in another: set up by script.

Shared by tests/integration/test_wordpress.py and bench/wordpress.py. Like
servers.py (whose recipes and pod runner it builds on): stdlib only, no pytest;
a problem is an AssertionError, software missing here is `Unavailable`.

- The site is Debian's WordPress (/usr/share/wordpress) copied to a directory
  of its own with its own wp-config.php. Debian's wp-config.php reads
  /etc/wordpress/config-HOST.php, and WordPress finds its config next to the
  real path of wp-load.php, so a symlinked tree would still read /etc: a copy
  (60 MiB, a tenth of a second) keeps every test's site to itself.
- The database is the MariaDB recipe of servers.py in a pod of its own; the
  site's DB_HOST is that pod's address, as a web pod in a cluster would have.
- The web pod's app is one process tree: a bash that starts php-fpm and nginx
  and exits when either does (so the activator restarts the pair). Both run as
  root (only root's tasks can be checkpointed on these machines; php-fpm needs
  -R for that, nginx `user root`); they talk over a unix socket in the pod's
  work dir, opened per request, so no connection between them is open while
  the pod is idle.
- Install and the post are made with PHP's command line on the host, through
  WordPress's own functions (wp_install, wp_insert_post), no clicks.
"""

from __future__ import annotations

import json
import re
import secrets
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.integration.harness import (
    ACTIVATOR,
    EVENT_TIMEOUT,
    START_TIMEOUT,
    Event,
    unique_name,
)
from tests.integration.servers import (
    Launch,
    MariaDB,
    PodRun,
    Scratch,
    Server,
    Unavailable,
    _out,
    _run_checked,
    http,
    which,
)

WORDPRESS = Path("/usr/share/wordpress")
DB_NAME = "wordpress"
DB_USER = "wordpress"


def php_fpm() -> str:
    """Debian names php-fpm after its PHP (php-fpm8.2): the newest one installed."""
    found = sorted(
        Path("/usr/sbin").glob("php-fpm[0-9]*"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)],
    )
    if not found:
        raise Unavailable("php-fpm is not installed (see scripts/setup-test-servers)")
    return str(found[-1])


def check_available() -> None:
    """Unavailable, naming what is missing, unless the whole stack can run here."""
    if not (WORDPRESS / "wp-settings.php").exists():
        raise Unavailable("WordPress is not installed (Debian's wordpress package)")
    if not list(WORDPRESS.glob("wp-content/themes/*/style.css")):
        raise Unavailable("WordPress has no theme (its pages would be blank)")
    for binary in ("nginx", "php", "bash", *MariaDB.binaries):
        which(binary)
    php_fpm()
    modules = _out([which("php"), "-m"]).split()
    if "mysqli" not in modules:
        raise Unavailable("PHP has no mysqli (Debian's php-mysql package)")


def versions() -> dict[str, str]:
    text = (WORDPRESS / "wp-includes" / "version.php").read_text()
    found = re.search(r"\$wp_version = '([^']+)'", text)
    php = re.search(r"PHP (\S+)", _out([which("php"), "-v"]))
    return {
        "wordpress": found.group(1) if found else "?",
        "php": php.group(1) if php else "?",
        "nginx": _out([which("nginx"), "-v"]).split("/")[-1],
        "mariadb": MariaDB().version(),
    }


@dataclass(frozen=True)
class Database:
    """WordPress's database and user in a MariaDB reached at `address`."""

    address: str
    password: str

    @classmethod
    def create(cls, mariadb: MariaDB, address: str) -> Database:
        password = secrets.token_hex(12)
        # '%': WordPress connects from the web pod's address, not from localhost.
        mariadb.sql(
            address,
            f"CREATE DATABASE {DB_NAME} CHARACTER SET utf8mb4;"
            f" CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{password}';"
            f" GRANT ALL PRIVILEGES ON {DB_NAME}.* TO '{DB_USER}'@'%';",
        )
        return cls(address, password)


@dataclass(frozen=True)
class Post:
    id: int
    title: str
    url: str

    @property
    def path(self) -> str:
        """The post's page on the site, whatever the address (pretty permalink or ?p=ID)."""
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


# Run by the host's PHP: `php setup.php DOCROOT COMMAND HOST ARG...`; prints one
# JSON line. It lives beside the docroot, not in it, so that nginx never serves it.
SETUP_PHP = r"""<?php
[, $docroot, $command, $host] = $argv;
$_SERVER['HTTP_HOST'] = $host;  // the address the site is reached at
$_SERVER['REQUEST_URI'] = '/';
if ($command === 'install') {
    define('WP_INSTALLING', true);
}
require $docroot . '/wp-load.php';
if ($command === 'install') {
    // Pluggable, so declared before upgrade.php: no mail to send from here.
    function wp_new_blog_notification() {}
    require_once ABSPATH . 'wp-admin/includes/upgrade.php';
    [, , , , $title, $password] = $argv;
    $result = wp_install($title, 'admin', 'admin@example.org', false, '', $password);
    echo json_encode(['user_id' => $result['user_id']]), "\n";
} elseif ($command === 'post') {
    [, , , , $title, $content] = $argv;
    wp_set_current_user(1);
    $id = wp_insert_post(['post_title' => $title, 'post_content' => $content,
                          'post_status' => 'publish'], true);
    if (is_wp_error($id)) {
        fwrite(STDERR, $id->get_error_message() . "\n");
        exit(1);
    }
    echo json_encode(['id' => $id, 'url' => get_permalink($id)]), "\n";
} else {
    fwrite(STDERR, "unknown command $command\n");
    exit(2);
}
"""


class Site:
    """A WordPress site in `directory`: a copy of Debian's tree and its wp-config.php."""

    def __init__(self, directory: Path, database: Database) -> None:
        self.directory = directory
        self.docroot = directory / "wordpress"
        self.database = database
        directory.mkdir(parents=True, exist_ok=True)
        _run_checked(["cp", "-a", str(WORDPRESS), str(self.docroot)], "copying WordPress")
        self.docroot.joinpath(".htaccess").unlink(missing_ok=True)  # Debian's, to /etc
        self.docroot.joinpath("wp-config.php").write_text(self._config())
        self.setup_php = directory / "setup.php"
        self.setup_php.write_text(SETUP_PHP)

    def _config(self) -> str:
        keys = ("AUTH_KEY", "SECURE_AUTH_KEY", "LOGGED_IN_KEY", "NONCE_KEY")
        salts = [f"define('{k}', '{secrets.token_hex(32)}');" for k in keys]
        salts += [f"define('{k[:-3]}SALT', '{secrets.token_hex(32)}');" for k in keys]
        lines = [
            "<?php",
            "// One test site (tests/integration/wordpress.py); Debian's /etc/wordpress unused.",
            f"define('DB_NAME', '{DB_NAME}');",
            f"define('DB_USER', '{DB_USER}');",
            f"define('DB_PASSWORD', '{self.database.password}');",
            f"define('DB_HOST', '{self.database.address}:{MariaDB.port}');",
            "define('DB_CHARSET', 'utf8mb4');",
            "define('DB_COLLATE', '');",
            "$table_prefix = 'wp_';",
            *salts,
            "// The site answers at whatever address it is asked for (the pod's).",
            "define('WP_HOME', 'http://' . ($_SERVER['HTTP_HOST'] ?? 'localhost'));",
            "define('WP_SITEURL', WP_HOME);",
            "// No background work after a page (WP-Cron's request to itself), no update",
            "// checks, no file changes: one page is one request and its database queries.",
            "define('DISABLE_WP_CRON', true);",
            "define('AUTOMATIC_UPDATER_DISABLED', true);",
            "define('WP_HTTP_BLOCK_EXTERNAL', true);",
            "define('DISALLOW_FILE_MODS', true);",
            "if (!defined('ABSPATH')) {",
            "    define('ABSPATH', __DIR__ . '/');",
            "}",
            "require_once ABSPATH . 'wp-settings.php';",
        ]
        return "\n".join(lines) + "\n"

    def _php(self, *args: str) -> Any:
        argv = [which("php"), str(self.setup_php), str(self.docroot), *args]
        out = _run_checked(argv, f"setup.php {args[0]}", cwd=self.directory)
        return json.loads(out.strip().splitlines()[-1])

    def install(self, web_address: str) -> None:
        """WordPress's install (tables, options, the admin user), as install.php does it."""
        answer = self._php("install", web_address, "Cascade test site", secrets.token_hex(12))
        assert answer["user_id"], answer

    def create_post(self, web_address: str, title: str, content: str) -> Post:
        answer = self._php("post", web_address, title, content)
        return Post(int(answer["id"]), title, str(answer["url"]))


class WordPressWeb(Server):
    """The web pod's app: php-fpm and nginx under one bash, serving `site`."""

    name = "wordpress"
    title = "WordPress (nginx + php-fpm)"
    port = 80
    binaries = ("nginx", "php", "bash")
    processes = 6  # bash, php-fpm master + 2 workers, nginx master + 1 worker
    wake_request = b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n"

    def __init__(self, site: Site) -> None:
        self.site = site

    def check_available(self) -> None:
        check_available()

    def version(self) -> str:
        found = versions()
        return f"WordPress {found['wordpress']} / PHP {found['php']} / nginx {found['nginx']}"

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        socket = workdir / "php-fpm.sock"
        fpm_conf = workdir / "php-fpm.conf"
        fpm_conf.write_text(
            textwrap.dedent(f"""\
                [global]
                pid = {workdir}/php-fpm.pid
                error_log = {workdir}/php-fpm.log
                daemonize = no
                [www]
                user = root
                group = root
                listen = {socket}
                ; A fixed set of workers: the same processes before and after a wake.
                pm = static
                pm.max_children = 2
                php_admin_value[error_log] = {workdir}/php-error.log
                php_admin_flag[log_errors] = on
            """)
        )
        temp = {t: workdir / f"nginx-{t}" for t in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        nginx_conf = workdir / "nginx.conf"
        nginx_conf.write_text(
            textwrap.dedent(f"""\
                user root;
                daemon off;
                master_process on;
                worker_processes 1;
                pid {workdir}/nginx.pid;
                error_log {workdir}/nginx-error.log warn;
                events {{ worker_connections 128; }}
                http {{
                    access_log off;
                    include /etc/nginx/mime.types;
                    client_body_temp_path {temp["body"]};
                    proxy_temp_path {temp["proxy"]};
                    fastcgi_temp_path {temp["fastcgi"]};
                    uwsgi_temp_path {temp["uwsgi"]};
                    scgi_temp_path {temp["scgi"]};
                    server {{
                        listen {self.port};
                        root {self.site.docroot};
                        index index.php;
                        location / {{
                            try_files $uri $uri/ /index.php?$args;
                        }}
                        location ~ \\.php$ {{
                            include /etc/nginx/fastcgi_params;
                            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
                            fastcgi_pass unix:{socket};
                        }}
                    }}
                }}
            """)
        )
        nginx = [which("nginx"), "-e", f"{workdir}/nginx-error.log", "-p", f"{workdir}/"]
        script = workdir / "run.sh"
        script.write_text(
            textwrap.dedent(f"""\
                # php-fpm and nginx as one app: the activator checkpoints one process tree.
                {php_fpm()} --nodaemonize --allow-to-run-as-root --fpm-config {fpm_conf} &
                {" ".join(nginx)} -c {nginx_conf} &
                # One of them ended: end the other too, so that the pod restarts both.
                wait -n
                kill $(jobs -p) 2>/dev/null
                wait
                exit 1
            """)
        )
        return Launch([which("bash"), str(script)], workdir)


# --- the two pods -------------------------------------------------------------------------


def scale_down(run: PodRun, timeout: float = EVENT_TIMEOUT) -> Event:
    """`activator scale-down NAME`, again while refused; the 'scaled-down' event.

    Refused while a connection is open: a client's close (ours, or PHP's to
    the database) can reach the activator a moment after the client is done.
    """
    deadline = time.monotonic() + timeout
    while True:
        mark = run.mark()
        _run_checked([str(ACTIVATOR), "scale-down", run.name], f"activator scale-down {run.name}")
        answer = run.wait_for(
            ("scaled-down", "scale-down-refused", "checkpoint-failed", "ignored"), after=mark
        )
        if answer["event"] == "scaled-down":
            return answer
        if answer["event"] == "ignored" and answer["phase"] == "scaled-down":
            return answer
        if answer["event"] != "scale-down-refused" or time.monotonic() > deadline:
            raise AssertionError(f"pod {run.name} did not scale down: {answer}")
        time.sleep(0.05)


@dataclass
class Stack:
    """MariaDB in one pod, WordPress in another, each under its own `activator run`.

    `start` makes both pods, the database, the site and a post; `teardown`
    stops both activators by pid and reports (then removes) whatever is left.
    The pods scale down only when asked (`scale_down`): a long idle time keeps
    the test and the bench in charge of which pod is cold.
    """

    workdir: Path
    scratch: Scratch
    extra_flags: tuple[str, ...] = ()
    db: PodRun | None = None
    web: PodRun | None = None
    site: Site | None = None
    post: Post | None = None

    def start(self) -> None:
        check_available()
        mariadb = MariaDB()
        self.db = self._pod(mariadb, mariadb.launch(self._dir("db-app"), self.scratch), "wp-db")
        self.db.wait_for("running", timeout=START_TIMEOUT)
        database = Database.create(mariadb, self.db.address())
        self.site = Site(self.workdir / "site", database)
        web = WordPressWeb(self.site)
        self.web = self._pod(web, web.launch(self._dir("web-app"), self.scratch), "wp-web")
        self.web.wait_for("running", timeout=START_TIMEOUT)
        self.site.install(self.web.address())
        title = f"Cascade post {secrets.token_hex(6)}"
        self.post = self.site.create_post(self.web.address(), title, f"<p>{title}: body</p>")

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True)
        return path

    def _pod(self, server: Server, launch: Launch, prefix: str) -> PodRun:
        name = unique_name(prefix)
        return PodRun.start(
            server,
            launch,
            self.workdir / name,
            name=name,
            scaledown_after="1h",
            extra_flags=self.extra_flags,
        )

    def get_post(self) -> tuple[str, float]:
        """GET the post's page through the web pod: (the page, seconds to the last byte)."""
        assert self.web is not None and self.post is not None
        started = time.perf_counter()
        status, body = http(self.web.address(), WordPressWeb.port, "GET", self.post.path)
        seconds = time.perf_counter() - started
        page = body.decode(errors="replace")
        assert status == 200, f"GET {self.post.path}: HTTP {status}: {page[:300]}"
        assert self.post.title in page, f"no {self.post.title!r} in the page: {page[:300]}"
        return page, seconds

    def teardown(self) -> list[str]:
        problems: list[str] = []
        for run in (self.web, self.db):  # the web pod first: its clients go first
            if run is not None:
                problems += run.teardown()
        return problems
