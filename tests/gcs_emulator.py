"""A Google Cloud Storage emulator on localhost that every GCS client Xenith uses reaches.

`python tests/gcs_emulator.py <bucket>` serves, in one process:
  - `gcp-storage-emulator` (PyPI), in memory, with `<bucket>` created: the JSON and XML
    APIs on plain HTTP. TensorStore (Orbax's arrays) talks to it directly
    (`TENSORSTORE_GCS_HTTP_URL`).
  - a TLS front for TensorFlow's GCS file system (`tf.io.gfile`: TensorBoard, and
    `etils.epath` for every other file), whose endpoints are fixed
    (https://www.googleapis.com, https://storage.googleapis.com) with no override. TF's
    libcurl honours `https_proxy`, and TF reads its CA bundle from `CURL_CA_BUNDLE`: the
    front is that proxy, answers CONNECT for those two hosts only with a certificate of a
    throw-away CA (trustme) and forwards the decrypted requests to the emulator. Nothing
    leaves the machine; any other host is refused.
It prints one JSON line (the environment a client needs, `env`) and serves until killed.
`GOOGLE_AUTH_TOKEN_FOR_TESTING` stands in for credentials in TF and TensorStore alike.
"""

import functools
import http.client
import http.server
import json
import logging
import os
import socketserver
import ssl
import sys
import tempfile
import threading
import urllib.parse

from gcp_storage_emulator import exceptions
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import buckets
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage
import trustme

_GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def _empty_media_upload(upload):
  """gcp-storage-emulator fails a zero-byte `uploadType=media` upload (TF's folder
  markers, `dir/`): its body parses to None. Real GCS stores an empty object."""

  def wrapped(request, response, storage):
    if request.data is None:
      request._data = b''  # pylint: disable=protected-access
    return upload(request, response, storage)

  return wrapped


objects._media_upload = _empty_media_upload(objects._media_upload)  # pylint: disable=protected-access


def _target(path: str, query: dict[str, list[str]]) -> tuple[str, str] | None:
  """(bucket, object) a write or delete request names; None for other requests."""
  parts = path.split('/')
  if path.startswith('/upload/storage/v1/b/') and 'name' in query:
    return parts[5], query['name'][0]
  if path.startswith('/storage/v1/b/') and len(parts) > 6 and parts[5] == 'o':
    rest = parts[6:]
    for verb in ('rewriteTo', 'copyTo'):  # .../o/<src>/rewriteTo/b/<bucket>/o/<dst>
      if verb in rest:
        i = rest.index(verb)
        return rest[i + 2], urllib.parse.unquote('/'.join(rest[i + 4:]))
    return parts[4], urllib.parse.unquote('/'.join(rest))
  return None


class _Handler(emulator_server.RequestHandler):
  """The emulator's handler, with GCS's generation preconditions (`ifGenerationMatch`,
  0 = the object must not exist) on writes and deletes, which the emulator ignores.
  Conditional writes are what make a create-only lock object possible on GCS."""

  def _precondition_failed(self) -> bool:
    url = urllib.parse.urlsplit(self.path)
    query = urllib.parse.parse_qs(url.query)
    target = _target(url.path, query)
    if 'ifGenerationMatch' not in query or target is None or 'upload_id' in query:
      return False
    try:
      generation = str(self.storage.get_file_obj(*target)['generation'])
    except exceptions.NotFound:
      generation = '0'
    if generation == query['ifGenerationMatch'][0]:
      return False
    self.send_response(412, 'Precondition Failed')
    body = json.dumps({'error': {'code': 412, 'message': 'conditionNotMet'}}).encode()
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)
    return True

  def _storage_layout(self) -> bool:
    """GET .../b/<bucket>/storageLayout, which TF asks before renaming a folder (the
    emulator has no such route): a flat bucket, no hierarchical namespace."""
    parts = urllib.parse.urlsplit(self.path).path.split('/')
    if len(parts) != 6 or parts[1:4] != ['storage', 'v1', 'b'] or parts[5] != 'storageLayout':
      return False
    body = json.dumps({'kind': 'storage#storageLayout', 'bucket': parts[4],
                       'location': 'US', 'locationType': 'multi-region',
                       'hierarchicalNamespace': {'enabled': False}}).encode()
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)
    return True

  def do_GET(self):
    if self._storage_layout():
      return
    # Downloads carry the object's generation (x-goog-generation), which TensorStore
    # reads to make its next conditional write; the emulator leaves it out.
    url = urllib.parse.urlsplit(self.path)
    target = _target(url.path, urllib.parse.parse_qs(url.query))
    self._generation = None
    if target is not None:
      try:
        self._generation = str(self.storage.get_file_obj(*target)['generation'])
      except exceptions.NotFound:
        pass
    super().do_GET()

  def end_headers(self):
    if self.command == 'GET' and getattr(self, '_generation', None):
      self.send_header('x-goog-generation', self._generation)
    super().end_headers()

  def do_POST(self):
    if not self._precondition_failed():
      super().do_POST()

  def do_PUT(self):
    if not self._precondition_failed():
      super().do_PUT()

  def do_DELETE(self):
    if not self._precondition_failed():
      super().do_DELETE()

  def do_PATCH(self):
    if not self._precondition_failed():
      super().do_PATCH()

  def log_message(self, *args):
    pass


class _Emulator(http.server.HTTPServer):
  # The emulator's store is not thread-safe: one request at a time, but a deep queue for
  # TensorStore's 32 concurrent requests.
  request_queue_size = 256


class _Forward(http.server.BaseHTTPRequestHandler):
  """One decrypted HTTP/1.1 connection from TF: each request goes to the emulator."""

  protocol_version = 'HTTP/1.1'
  emulator_port = 0

  def _body(self) -> bytes | None:
    # TF sends uploads chunked (and a Content-Length beside it, which chunking overrides).
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      chunks = []
      while size := int(self.rfile.readline().split(b';')[0], 16):
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # Trailers.
        pass
      return b''.join(chunks)
    length = self.headers.get('Content-Length')
    return None if length is None else self.rfile.read(int(length))

  def _forward(self):
    body = self._body()
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ('connection', 'expect', 'proxy-connection',
                                    'transfer-encoding', 'content-length')}
    upstream = http.client.HTTPConnection('127.0.0.1', self.emulator_port, timeout=60)
    try:
      if body is not None:
        headers['Content-Length'] = str(len(body))
      upstream.request(self.command, self.path, body=body, headers=headers)
      response = upstream.getresponse()
      data = response.read()
      self.send_response(response.status, response.reason)
      for key, value in response.getheaders():
        if key.lower() in ('content-length', 'connection', 'transfer-encoding', 'server',
                           'date'):
          continue
        if key.lower() == 'location':  # Resumable uploads: come back through the proxy.
          value = value.replace('http://', 'https://', 1)
        self.send_header(key, value)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(data)
    finally:
      upstream.close()

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, *args):
    pass


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 256


class _Connect(socketserver.StreamRequestHandler):
  """An HTTPS proxy that terminates CONNECT to Google's storage hosts itself."""

  tls: ssl.SSLContext

  def handle(self):
    line = self.rfile.readline().decode('latin-1').split()
    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
      pass
    host = line[1].rsplit(':', 1)[0] if len(line) == 3 and line[0] == 'CONNECT' else ''
    if host not in _GOOGLE_HOSTS:
      self.wfile.write(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
      return
    self.wfile.write(b'HTTP/1.1 200 Connection established\r\n\r\n')
    self.wfile.flush()
    try:
      tls = self.tls.wrap_socket(self.request, server_side=True)
    except (ssl.SSLError, OSError):
      return
    _Forward(tls, self.client_address, self.server)


def serve(bucket: str) -> None:
  """Starts both servers, prints the client environment as JSON, serves forever."""
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # Every 404 logs.
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  emulator = _Emulator(('127.0.0.1', 0),
                       functools.partial(_Handler, storage))
  threading.Thread(target=emulator.serve_forever, daemon=True).start()

  ca = trustme.CA()
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  ca.issue_cert(*_GOOGLE_HOSTS).configure_cert(tls)
  ca_file = os.path.join(tempfile.mkdtemp(prefix='gcs-emulator-'), 'ca.pem')
  ca.cert_pem.write_to_path(ca_file)
  _Forward.emulator_port = emulator.server_address[1]
  _Connect.tls = tls
  proxy = _Proxy(('127.0.0.1', 0), _Connect)

  endpoint = f'http://127.0.0.1:{emulator.server_address[1]}'
  env = {
      'TENSORSTORE_GCS_HTTP_URL': endpoint,
      'STORAGE_EMULATOR_HOST': endpoint,  # gcsfs and google-cloud-storage, if present.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'https_proxy': f'http://127.0.0.1:{proxy.server_address[1]}',
      'no_proxy': '127.0.0.1,localhost',
      'CURL_CA_BUNDLE': ca_file,
  }
  print(json.dumps({'endpoint': endpoint, 'env': env}), flush=True)
  proxy.serve_forever()


if __name__ == '__main__':
  serve(sys.argv[1])
