"""Network reachability: a download that cannot reach its server fails in
seconds instead of minutes of retries (`network_unreachable_reason`)."""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request
from typing import Optional

#: The host a TFDS download of each dataset contacts first.
DOWNLOAD_HOSTS = {
    'mnist': 'storage.googleapis.com',
    'cifar10': 'www.cs.toronto.edu',
    'svhn_cropped': 'ufldl.stanford.edu',
}

#: Seconds the network check waits for a connection before calling the network unreachable.
NETWORK_TIMEOUT = 10.0


def network_unreachable_reason(
    host: str, port: int = 443, timeout: float = NETWORK_TIMEOUT
) -> Optional[str]:
    """Why `host` cannot be reached, or `None` when a TCP connection opens.

    Opens (and closes) one TCP connection to `host:port`, or to the HTTPS
    proxy of the environment (`https_proxy`, `all_proxy`; `no_proxy` honoured)
    when one is set, as a download would. Name resolution and connection
    together are bounded by about `timeout` seconds. TFDS instead retries a
    failing download for minutes; `load_image_dataset` asks this first.

    Args:
      host: The server a download would contact.
      port: Its port (443: HTTPS).
      timeout: Seconds to wait for the connection.

    Returns:
      `None` if the connection opened, else a one-line reason naming the
      address (and the proxy) that could not be reached and the error.

    #### Examples

    ```python
    reason = network_unreachable_reason('storage.googleapis.com')
    if reason:
        print('offline:', reason)
    ```
    """
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get('https') or proxies.get('all')
    if proxy and urllib.request.proxy_bypass_environment(host, proxies):
        proxy = None
    target, via = (host, int(port)), ''
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if '://' in proxy else 'http://' + proxy)
        default_port = 443 if parsed.scheme == 'https' else 80
        target = (parsed.hostname or '', parsed.port or default_port)
        via = f' (the HTTPS proxy {proxy} for {host})'
    outcome = {}

    def connect():
        try:
            with socket.create_connection(target, timeout=timeout):
                outcome['ok'] = True
        except OSError as e:  # socket.gaierror and timeouts are OSErrors
            outcome['error'] = f'{type(e).__name__}: {e}'

    worker = threading.Thread(target=connect, daemon=True, name='network_check')
    worker.start()
    worker.join(timeout + 2.0)
    if outcome.get('ok'):
        return None
    error = outcome.get('error', f'no answer within {timeout:g} s')
    return f'cannot connect to {target[0]}:{target[1]}{via}: {error}'
