// Shared helpers for the Node reference servers: CLI/env parsing and JSON request reports.
import { parseArgs } from 'node:util'

/**
 * Read the server options from CLI flags, falling back to environment variables.
 * @returns {{host: string, port: number, facilitator: string, asset: string, payTo: string, price: string,
 *   network: string, tokenName: string, tokenVersion: string, maxTimeout: number}}
 */
export function readOptions(defaultNetwork) {
  const { values } = parseArgs({
    options: {
      host: { type: 'string', default: process.env.HOST ?? '127.0.0.1' },
      port: { type: 'string', default: process.env.PORT },
      facilitator: { type: 'string', default: process.env.X402_FACILITATOR_URL },
      asset: { type: 'string', default: process.env.X402_ASSET },
      'pay-to': { type: 'string', default: process.env.X402_PAY_TO },
      price: { type: 'string', default: process.env.X402_PRICE ?? '1000' },
      network: { type: 'string', default: process.env.X402_NETWORK ?? defaultNetwork },
      'token-name': { type: 'string', default: 'USDC' },
      'token-version': { type: 'string', default: '2' },
      'max-timeout': { type: 'string', default: '60' },
    },
  })
  for (const required of ['port', 'facilitator', 'asset', 'pay-to']) {
    if (!values[required]) {
      console.error(`missing --${required}`)
      process.exit(2)
    }
  }
  if (!/^\d+$/.test(values.price)) {
    // Atomic units only: a "$0.01" price would resolve to the real Base Sepolia USDC.
    console.error(`--price must be an integer amount of atomic units, got ${values.price}`)
    process.exit(2)
  }
  return {
    host: values.host,
    port: Number(values.port),
    facilitator: values.facilitator.replace(/\/+$/, ''),
    asset: values.asset,
    payTo: values['pay-to'],
    price: values.price,
    network: values.network,
    tokenName: values['token-name'],
    tokenVersion: values['token-version'],
    maxTimeout: Number(values['max-timeout']),
  }
}

/** Counts handler invocations per path, served at GET /__stats. */
export function createStats() {
  const handled = {}
  return {
    handled,
    hit(path) {
      handled[path] = (handled[path] ?? 0) + 1
    },
  }
}

/** JSON report of the request as the origin saw it (method, path, headers, whether it carried a payment). */
export function report(req, extra = {}) {
  const paymentHeader = req.headers['payment-signature'] ?? req.headers['x-payment']
  return {
    ok: true,
    method: req.method,
    path: req.path,
    query: req.originalUrl.includes('?') ? req.originalUrl.slice(req.originalUrl.indexOf('?') + 1) : '',
    headers: req.headers,
    paid: Boolean(paymentHeader),
    ...extra,
  }
}
