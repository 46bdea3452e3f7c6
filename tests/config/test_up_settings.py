# The all-in-one settings file (`aforo up --config`): the example is valid, the proxy
# section is pointed at the control plane, and every mistake is reported at its line
# and path in this file, as the proxy and control plane files would report it.
import textwrap
from pathlib import Path

import pytest

import config
from config import ConfigError
from config.up_settings import load_up_settings, parse_up_settings

EXAMPLES = Path(config.__file__).parent / "examples"
SECRETS = {"AFORO_WEBHOOK_SECRET_FINANCE": "s1", "AFORO_WEBHOOK_SECRET_ENGINEERING": "s2", "AFORO_WEBHOOK_SECRET_ACME": "s3"}
GOOD = textwrap.dedent("""\
    control_plane:
      listen: 0.0.0.0:8070
      database: state/aforo.db
    catalog: catalog.yaml
    proxy:
      upstreams:
        api: {url: "http://127.0.0.1:8001"}
      routes:
        - {name: api, upstream: api}
    """)


def error_of(text, environ=None):
    with pytest.raises(ConfigError) as caught:
        parse_up_settings(text, "aforo.yaml", environ=environ or {})
    return "\n".join(str(error) for error in caught.value.errors)


def test_the_example_is_valid_and_its_paths_are_read_from_its_folder():
    settings = load_up_settings(EXAMPLES / "aforo.yaml", environ=SECRETS)
    assert settings.catalog == str(EXAMPLES / "catalog.yaml")
    assert settings.control_plane.database == str(EXAMPLES / "aforo.db")
    assert settings.proxy.control_plane.url == "http://127.0.0.1:8070"
    assert settings.proxy.metering.spool_dir == str(EXAMPLES / "meter-spool")


def test_the_control_plane_section_takes_the_edge_resync_interval():
    text = GOOD.replace("  database: state/aforo.db\n", "  database: state/aforo.db\n  edge_resync_interval_s: 30\n")
    assert parse_up_settings(text, "aforo.yaml", environ={}).control_plane.edge_resync_interval_s == 30.0


def test_the_proxy_reaches_a_wildcard_control_plane_on_loopback(tmp_path):
    settings = parse_up_settings(GOOD, "aforo.yaml", tmp_path, environ={})
    assert settings.proxy.control_plane.url == "http://127.0.0.1:8070"
    assert settings.proxy.edge_state is None
    assert settings.control_plane.database == str(tmp_path / "state" / "aforo.db")


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("  routes:\n", "  edge_state: {file: edge.yaml}\n  routes:\n",
         "aforo.yaml:8: `aforo up` sets the proxy's `edge_state` itself; remove it from the `proxy` section "
         "- at `$.proxy.edge_state`"),
        ("0.0.0.0:8070", "127.0.0.1:0",
         "aforo.yaml:2: `aforo up` needs a fixed port for the control plane (the proxies connect to it) "
         "- at `$.control_plane.listen`"),
        ("upstream: api}", "upstream: apx}",
         "aforo.yaml:9: Unknown upstream `apx`; the upstreams are `api` - at `$.proxy.routes[0].upstream`"),
        ("  database: state/aforo.db\n", "  database: state/aforo.db\n  edge_resync_interval_s: 0\n",
         "aforo.yaml:4: Expected `float` > 0.0 - at `$.control_plane.edge_resync_interval_s`"),
        ("catalog: catalog.yaml", "catalogue: catalog.yaml",
         "aforo.yaml:4: Object contains unknown field `catalogue`"),
        ("  database: state/aforo.db\n", "  notify:\n    ops: {url: \"https://h.example\", "
                                             "secret_env: OPS_SECRET}\n",
         "aforo.yaml:4: Environment variable `OPS_SECRET` is not set; it holds the signing secret of notify "
         "channel `ops` - at `$.control_plane.notify.ops.secret_env`"),
    ],
)
def test_mistakes_are_reported_where_they_are(replace, by, message):
    assert replace in GOOD
    assert error_of(GOOD.replace(replace, by)) == message
