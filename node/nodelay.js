// Preload (node --import ./nodelay.js): TCP_NODELAY on every TCP socket of the process.
//
// Why: bitswap sends small request frames and waits for the reply; with Nagle's algorithm
// and delayed ACKs on loopback each round trip stalls ~40-200 ms, so js-ipfs fetched one
// 256 KiB block per ~230 ms. libp2p's TCP transport and the HTTP API never set the option,
// so we set it here for outgoing sockets (before connect) and accepted ones (on 'connection').
import net from 'node:net'

const connect = net.Socket.prototype.connect
net.Socket.prototype.connect = function (...args) {
  this.setNoDelay(true)
  return connect.apply(this, args)
}

const emit = net.Server.prototype.emit
net.Server.prototype.emit = function (event, socket, ...rest) {
  if (event === 'connection' && socket != null && typeof socket.setNoDelay === 'function') {
    socket.setNoDelay(true)
  }
  return emit.call(this, event, socket, ...rest)
}
