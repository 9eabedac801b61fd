// The managed js-ipfs daemon ipfsnap runs (ipfsnap.ipfs.node.ManagedNode starts it).
//
//   IPFS_PATH=REPO node --import ./nodelay.js daemon.js [--offline]   run the daemon
//   IPFS_PATH=REPO node daemon.js --init                              create the repo, exit
//
// What it adds to js-ipfs 0.66.1's own daemon: Kubo-compatible private networks. js-ipfs
// ignores $IPFS_PATH/swarm.key and LIBP2P_FORCE_PNET; here a repo with swarm.key gets a
// libp2p pre-shared-key connection protector (the same PSK v1 scheme as Kubo), and with
// LIBP2P_FORCE_PNET=1 a repo without one refuses to start. Prints one "ready" line with the
// API address, stops cleanly (repo closed, api file removed) on SIGTERM or SIGINT.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { create } from 'ipfs-core'
import { Daemon } from 'ipfs-daemon'
import { createLibp2p } from 'libp2p'
import { preSharedKey } from 'libp2p/pnet'

const PREFIX = 'ipfsnap-node:'
// exit codes ipfsnap maps to messages: 2 usage, 3 private network required/invalid key
const EXIT_USAGE = 2
const EXIT_PNET = 3

function fail (code, message) {
  process.stderr.write(`${PREFIX} ${message}\n`)
  process.exit(code)
}

const args = process.argv.slice(2)
for (const a of args) {
  if (!['--init', '--offline'].includes(a)) fail(EXIT_USAGE, `unknown argument ${a}`)
}
const repo = process.env.IPFS_PATH || path.join(os.homedir(), '.jsipfs')

// config merged into a NEW repo's defaults (ipfsnap passes its loopback-only settings here,
// so a first start needs no separate init run: loading js-ipfs alone costs seconds)
let initConfig
try {
  initConfig = JSON.parse(process.env.IPFSNAP_INIT_CONFIG || '{}')
} catch (err) {
  fail(EXIT_USAGE, `IPFSNAP_INIT_CONFIG is not JSON: ${err.message}`)
}
const init = { profiles: ['test'] }

if (args.includes('--init')) {
  const ipfs = await create({ repo, init, config: initConfig, start: false, silent: true })
  await ipfs.stop()
  process.stdout.write(`${PREFIX} initialised ${repo}\n`)
  process.exit(0)
}

const keyPath = path.join(repo, 'swarm.key')
let psk = null
if (fs.existsSync(keyPath)) {
  psk = fs.readFileSync(keyPath)
  // never print the key: only check its shape (libp2p parses it again)
  const lines = psk.toString('utf8').trim().split(/\r?\n/)
  if (lines.length !== 3 || lines[0].trim() !== '/key/swarm/psk/1.0.0/') {
    fail(EXIT_PNET, `${keyPath}: malformed swarm key`)
  }
} else if (process.env.LIBP2P_FORCE_PNET === '1') {
  fail(EXIT_PNET, `${repo}: LIBP2P_FORCE_PNET=1 but there is no ${keyPath}; ` +
    'refusing to start outside a private network')
}

const offline = args.includes('--offline')

/** libp2p factory: ipfs-core's options plus the PSK protector when the repo has a key; with
 * --offline the swarm listens nowhere and a gate refuses every dial (js-ipfs 0.66 takes an
 * `offline` option but still starts its swarm; libp2p wants at least one transport), so the
 * node serves local content only, as Kubo's `daemon --offline` */
async function libp2p ({ libp2pOptions }) {
  const options = { ...libp2pOptions }
  if (psk != null) {
    options.connectionProtector = preSharedKey({ psk })
  }
  if (offline) {
    const deny = async () => true
    options.connectionGater = {
      ...options.connectionGater, denyDialPeer: deny, denyDialMultiaddr: deny
    }
    options.peerDiscovery = []
    options.addresses = { ...options.addresses, listen: [], announce: [] }
  }
  return createLibp2p(options)
}

// ipfs-core applies `init.profiles` and merges `config` at init AND at every later start
// (overwriting e.g. a bootstrap list edited since), so pass them only for a new repo
const isNew = !fs.existsSync(path.join(repo, 'config'))
const daemon = new Daemon({
  repo,
  ...(isNew ? { init, config: initConfig } : {}),
  offline,
  silent: true,
  preload: { enabled: false },
  libp2p
})

let stopping = false
async function stop (signal) {
  if (stopping) return
  stopping = true
  process.stdout.write(`${PREFIX} ${signal}: stopping\n`)
  try {
    await daemon.stop()
  } catch (err) {
    process.stderr.write(`${PREFIX} error while stopping: ${err.message}\n`)
    process.exit(1)
  }
  process.stdout.write(`${PREFIX} stopped\n`)
  process.exit(0)
}
process.on('SIGTERM', () => { stop('SIGTERM') })
process.on('SIGINT', () => { stop('SIGINT') })

// IPFSNAP_PARENT_PID: stop when that process is gone (we get re-parented), so a test run or
// CLI killed with SIGKILL leaves no daemon behind. Unset for nodes meant to outlive their starter.
const parent = Number(process.env.IPFSNAP_PARENT_PID || 0)
if (parent > 0) {
  const WATCH_MS = 1000
  setInterval(() => {
    if (process.ppid !== parent) stop('parent exited')
  }, WATCH_MS).unref()
}

try {
  await daemon.start()
} catch (err) {
  fail(1, `cannot start js-ipfs on ${repo}: ${err.message}`)
}
const api = fs.readFileSync(path.join(repo, 'api'), 'utf8').trim()
process.stdout.write(`${PREFIX} ready api=${api} pnet=${psk != null}\n`)
