// Reference V2 resource server: Express + @x402/express, priced in the local TestUSDC.
// Routes: GET /free, GET /paid/a, GET /paid/fail500 (handler 500 -> no settlement),
// POST /paid/echo, GET /__stats.
// Run: node tests/stack/server_express_v2.mjs --port P --facilitator URL --asset 0x.. --pay-to 0x.. [--price 1000]
import express from 'express'
import { paymentMiddleware, x402ResourceServer } from '@x402/express'
import { HTTPFacilitatorClient } from '@x402/core/server'
import { ExactEvmScheme } from '@x402/evm/exact/server'
import { createStats, readOptions, report } from './_common.mjs'

const opts = readOptions('eip155:84532')
const stats = createStats()

// Always an explicit loopback facilitator URL: the SDK default is the public x402.org facilitator.
const facilitator = new HTTPFacilitatorClient({ url: opts.facilitator })
const resourceServer = new x402ResourceServer(facilitator).register(opts.network, new ExactEvmScheme())

const accepts = {
  scheme: 'exact',
  network: opts.network,
  payTo: opts.payTo,
  price: {
    amount: opts.price,
    asset: opts.asset,
    extra: { name: opts.tokenName, version: opts.tokenVersion },
  },
  maxTimeoutSeconds: opts.maxTimeout,
}
const routes = {
  'GET /paid/a': { accepts, description: 'paid resource A', mimeType: 'application/json' },
  'GET /paid/fail500': { accepts, description: 'paid resource whose handler fails', mimeType: 'application/json' },
  'POST /paid/echo': { accepts, description: 'paid echo', mimeType: 'application/json' },
}

const app = express()
app.disable('x-powered-by')
app.use(paymentMiddleware(routes, resourceServer))
app.use(express.raw({ type: () => true, limit: '10mb' }))

app.get('/free', (req, res) => {
  stats.hit('/free')
  res.json(report(req))
})
app.get('/paid/a', (req, res) => {
  stats.hit('/paid/a')
  res.json(report(req, { resource: 'a' }))
})
app.get('/paid/fail500', (req, res) => {
  stats.hit('/paid/fail500')
  res.status(500).json({ ...report(req), ok: false, error: 'handler failed on purpose' })
})
app.post('/paid/echo', (req, res) => {
  stats.hit('/paid/echo')
  const body = Buffer.isBuffer(req.body) ? req.body.toString('utf8') : ''
  res.json(report(req, { body }))
})
app.get('/__stats', (req, res) => res.json({ handled: stats.handled }))

const server = app.listen(opts.port, opts.host, () => {
  console.log(`express-v2 listening on http://${opts.host}:${opts.port}`)
})
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)))
