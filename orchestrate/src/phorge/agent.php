<?php
// shardmove's Phorge agent: one PHP process, run inside the Phorge checkout for a whole
// batch, that carries out the runbook's registry steps through Phorge's own editors and
// transactions (what `bin/repository maintenance|clusterize|thaw` do), one request per line
// of JSON on stdin, one answer per line on stdout.
//
// Why: every `bin/repository` call starts PHP and loads Phorge (0.3-0.5 s here); four of them
// inside a repository's read-only window made a multi-second window. Loaded once, each step
// costs a few database transactions.
//
// Run as: php -r CODE ROOT   (CODE is this file without its first line; ROOT the checkout)
// Requests: {"op": "...", ...}; answers: {"ok": true, ...} or {"ok": false, "error": "..."}.

$root = $argv[1];
require_once $root.'/scripts/init/init-script.php';

$viewer = PhabricatorUser::getOmnipotentUser();
$source = PhabricatorContentSource::newForSource(
  PhabricatorConsoleContentSource::SOURCECONST);
$diffusion = id(new PhabricatorDiffusionApplication())->getPHID();

function shardmove_repo($viewer, $ref) {
  $repo = id(new PhabricatorRepositoryQuery())
    ->setViewer($viewer)
    ->withIdentifiers(array($ref))
    ->executeOne();
  if (!$repo) {
    throw new Exception("no repository \"$ref\"");
  }
  return $repo;
}

function shardmove_service($viewer, $name) {
  $service = id(new AlmanacServiceQuery())
    ->setViewer($viewer)
    ->withNames(array($name))
    ->withServiceTypes(array(AlmanacClusterRepositoryServiceType::SERVICETYPE))
    ->needActiveBindings(true)
    ->executeOne();
  if (!$service) {
    throw new Exception("no repository service \"$name\"");
  }
  return $service;
}

function shardmove_device($viewer, $name) {
  $device = id(new AlmanacDeviceQuery())
    ->setViewer($viewer)
    ->withNames(array($name))
    ->executeOne();
  if (!$device) {
    throw new Exception("no device \"$name\"");
  }
  return $device;
}

function shardmove_edit($viewer, $source, $diffusion, $repo, $type, $value) {
  $xactions = array();
  $xactions[] = id(new PhabricatorRepositoryTransaction())
    ->setTransactionType($type)
    ->setNewValue($value);
  id(new PhabricatorRepositoryEditor())
    ->setActor($viewer)
    ->setActingAsPHID($diffusion)
    ->setContentSource($source)
    ->setContinueOnNoEffect(true)
    ->setContinueOnMissingFields(true)
    ->applyTransactions($repo, $xactions);
}

function shardmove_state($viewer, $repo) {
  $repo = shardmove_repo($viewer, $repo->getPHID());
  $service = $repo->loadAlmanacService();
  $versions = array();
  foreach (PhabricatorRepositoryWorkingCopyVersion::loadVersions(
    $repo->getPHID()) as $v) {
    $device = id(new AlmanacDeviceQuery())
      ->setViewer($viewer)
      ->withPHIDs(array($v->getDevicePHID()))
      ->executeOne();
    $versions[] = array(
      'device' => $device ? $device->getName() : $v->getDevicePHID(),
      'version' => (int)$v->getRepositoryVersion(),
      'writing' => (bool)$v->getIsWriting(),
    );
  }
  return array(
    'repository' => $repo->getMonogram(),
    'callsign' => $repo->getCallsign(),
    'phid' => $repo->getPHID(),
    'local_path' => $repo->getLocalPath(),
    'service' => $service ? $service->getName() : null,
    'read_only' => (bool)$repo->isReadOnly(),
    'versions' => $versions,
  );
}

function shardmove_handle($req, $viewer, $source, $diffusion) {
  $op = idx($req, 'op');
  switch ($op) {
    case 'config':
      return array(
        'default_local_path' =>
          PhabricatorEnv::getEnvConfig('repository.default-local-path'),
      );
    case 'state':
      return shardmove_state($viewer, shardmove_repo($viewer, $req['repo']));
    case 'freeze':
      // Maintenance first (the front refuses new pushes from here), then the repository's
      // write lock, which every push holds while it writes: once we get it, no push is in
      // flight any more.
      $repo = shardmove_repo($viewer, $req['repo']);
      shardmove_edit($viewer, $source, $diffusion, $repo,
        PhabricatorRepositoryMaintenanceTransaction::TRANSACTIONTYPE, $req['message']);
      $lock = PhabricatorRepositoryWorkingCopyVersion::getWriteLock($repo->getPHID());
      try {
        $lock->lock((int)$req['wait']);
      } catch (PhutilLockException $e) {
        throw new Exception('pushes still in flight after '.$req['wait'].' s');
      }
      $lock->unlock();
      return array();
    case 'unfreeze':
      $repo = shardmove_repo($viewer, $req['repo']);
      shardmove_edit($viewer, $source, $diffusion, $repo,
        PhabricatorRepositoryMaintenanceTransaction::TRANSACTIONTYPE, null);
      return array();
    case 'clusterize':
      $repo = shardmove_repo($viewer, $req['repo']);
      $service = shardmove_service($viewer, $req['service']);
      shardmove_edit($viewer, $source, $diffusion, $repo,
        PhabricatorRepositoryServiceTransaction::TRANSACTIONTYPE, $service->getPHID());
      return array();
    case 'promote':
      // `thaw --demote FROM --force` then `thaw --promote TO --force`, under the write lock,
      // back to back; a promotion that already happened (TO is the leader) is success.
      $repo = shardmove_repo($viewer, $req['repo']);
      $from = shardmove_device($viewer, $req['from_device']);
      $to = shardmove_device($viewer, $req['to_device']);
      $lock = PhabricatorRepositoryWorkingCopyVersion::getWriteLock($repo->getPHID());
      $lock->lock(300);
      try {
        $service = $repo->loadAlmanacService();
        if (!$service) {
          throw new Exception('repository is not on a cluster service');
        }
        $bindings = mpull($service->getActiveBindings(), null, 'getDevicePHID');
        if (empty($bindings[$to->getPHID()])) {
          throw new Exception('device "'.$to->getName().'" is not actively bound to '.
            'the repository\'s service "'.$service->getName().'": clusterize first');
        }
        PhabricatorRepositoryWorkingCopyVersion::demoteDevice(
          $repo->getPHID(), $from->getPHID());
        $versions = mpull(
          PhabricatorRepositoryWorkingCopyVersion::loadVersions($repo->getPHID()),
          null, 'getDevicePHID');
        $others = array_diff_key($versions, array($to->getPHID() => true));
        if ($others) {
          throw new Exception('other devices still hold versions of the repository: '.
            implode(', ', array_keys($others)));
        }
        $already = isset($versions[$to->getPHID()]);
        if (!$already) {
          PhabricatorRepositoryWorkingCopyVersion::updateVersion(
            $repo->getPHID(), $to->getPHID(), 0);
        }
      } catch (Exception $e) {
        $lock->unlock();
        throw $e;
      }
      $lock->unlock();
      return array('already' => $already);
    default:
      throw new Exception('unknown op "'.$op.'"');
  }
}

while (($line = fgets(STDIN)) !== false) {
  $req = json_decode($line, true);
  try {
    if (!is_array($req)) {
      throw new Exception('a request is one JSON object per line');
    }
    $answer = array('ok' => true) + shardmove_handle($req, $viewer, $source, $diffusion);
  } catch (Throwable $e) {
    $answer = array('ok' => false, 'error' => $e->getMessage());
  }
  echo json_encode($answer), "\n";
  fflush(STDOUT);
}
